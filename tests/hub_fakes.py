"""A stand-in for the Hugging Face Hub, replacing it at the HfApi boundary (the Hub cannot be reached here).

``FakeHub.install(monkeypatch)`` replaces the three ``HfApi`` methods SlimDiff's uploads call: ``create_repo``,
``create_branch`` and ``upload_folder``. ``upload_folder`` keeps what the real one would send: every file under
``folder_path`` except huggingface_hub's own ``DEFAULT_IGNORE_PATTERNS`` (SlimDiff passes no allow/ignore
patterns, which is asserted), after deleting the remote files its ``delete_patterns`` match (never
``.gitattributes``), filtered with huggingface_hub's own ``filter_repo_objects``.

``FakeHub.materialize(cache_dir)`` writes the repositories in the real huggingface_hub cache layout
(``models--owner--name/snapshots/<commit>/`` + ``refs/<branch>``), so tests read them back the way a Hub user
does: ``DiffusionPipeline.from_pretrained(repo_id, cache_dir=..., local_files_only=True)``, ``hf_hub_download``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects


@dataclass
class FakeHub:
    repos: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)  # repo -> branch -> path -> bytes
    calls: list[tuple[str, dict]] = field(default_factory=list)
    commits: int = 0

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok,
                                              "token": api.token}))
            if repo_id in hub.repos and not exist_ok:
                raise huggingface_hub.errors.HfHubHTTPError(f"409: {repo_id} already exists")
            hub.repos.setdefault(repo_id, {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}})
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch}))
            branches = hub.repos[repo_id]
            if branch in branches and not exist_ok:
                raise huggingface_hub.errors.HfHubHTTPError(f"409: branch {branch} exists")
            branches.setdefault(branch, dict(branches["main"]))

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, revision=None, delete_patterns=None,
                          allow_patterns=None, ignore_patterns=None, commit_message=None, create_pr=False, **kwargs):
            assert allow_patterns is None and ignore_patterns is None and not path_in_repo, \
                "SlimDiff uploads whole folders; this fake models that case only"
            hub.calls.append(("upload_folder", {"repo_id": repo_id, "revision": revision, "commit_message": commit_message,
                                                "delete_patterns": delete_patterns}))
            if repo_id not in hub.repos:
                raise huggingface_hub.errors.RepositoryNotFoundError(f"404: {repo_id}")
            files = hub.repos[repo_id][revision or "main"]
            if delete_patterns:
                for path in list(filter_repo_objects(list(files), allow_patterns=delete_patterns)):
                    if path != ".gitattributes":
                        del files[path]
            root = Path(folder_path)
            local = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            for rel in filter_repo_objects(local, ignore_patterns=DEFAULT_IGNORE_PATTERNS):
                files[rel] = (root / rel).read_bytes()
            hub.commits += 1
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{hub.commits:040x}",
                                              commit_message=commit_message or "", commit_description="",
                                              oid=f"{hub.commits:040x}")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id][branch]

    def materialize(self, cache_dir: Path) -> Path:
        """Write every repository and branch in the huggingface_hub cache layout under ``cache_dir``."""
        for repo_id, branches in self.repos.items():
            repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
            for branch, files in branches.items():
                commit = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                                      .encode()).hexdigest()
                for rel, data in files.items():
                    (repo / "snapshots" / commit / rel).parent.mkdir(parents=True, exist_ok=True)
                    (repo / "snapshots" / commit / rel).write_bytes(data)
                (repo / "refs").mkdir(parents=True, exist_ok=True)
                (repo / "refs" / branch).write_text(commit)
        return Path(cache_dir)
