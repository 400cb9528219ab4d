"""pytest plugin (environment substitute, for machines without Hub access): diffusers' fast pipeline tests build
their tokenizer with ``CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")``. Without the Hub
that call retries for about 4 minutes and then fails, in every test: the reason the Stable Diffusion fast tests
did not finish here before. This plugin answers that one repository id with a local character-level CLIP
tokenizer (lower-case letters, digits and punctuation; ids < 1000, as the tests' text encoder has vocab_size=1000;
77 tokens; <|endoftext|> = 2 like the tests' eos_token_id), written once to a temporary folder. Every other
``from_pretrained`` is left alone.

Load with ``-p offline_tokenizer_plugin`` in *both* runs (stock baseline and slim), so the two see the same
tokens; tests that compare against hard-coded pixel values then fail in both runs (other tokens than the real
tokenizer's), which the classification reads as environment. Set ``HF_HUB_OFFLINE=1`` too, so that any other Hub
access fails at once instead of retrying.
"""
import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

REPO = "hf-internal-testing/tiny-random-clip"
_orig = CLIPTokenizer.from_pretrained.__func__
_folder: Path | None = None


def _local_tokenizer_folder() -> Path:
    global _folder
    if _folder is None:
        folder = Path(tempfile.mkdtemp(prefix="tiny_random_clip_offline_"))
        vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
        for c in string.ascii_lowercase + string.digits + string.punctuation:
            vocab.setdefault(c, len(vocab))
            vocab.setdefault(c + "</w>", len(vocab))
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "!",
                                                                    "tokenizer_class": "CLIPTokenizer"}))
        _folder = folder
    return _folder


@classmethod
def from_pretrained(cls, name, *args, **kwargs):
    if str(name) == REPO:
        return _orig(cls, str(_local_tokenizer_folder()), *args, **kwargs)
    return _orig(cls, name, *args, **kwargs)


CLIPTokenizer.from_pretrained = from_pretrained
