"""PROTOTYPE (removed in the next commit; decisions row 28): the VO reader refit's relative error on flux-tiny at the
planned ranks, uncentred (the default) against a centred refit with an intercept in the reader's bias.
Run: PYTHONPATH=. python benchmarks/proto_vo_intercept.py"""
import torch, slimdiff_diffusers as sd
from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, get_embedded_model
from slimdiff_diffusers.diffusers_adapter.pipeline import calibrate_pipeline
from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet
from slimdiff_diffusers.core.decompositions import reader_refit_maps, _out_per_head
torch.set_num_threads(1)
emb = get_embedded_model("flux-tiny"); pipe = emb.load()
slimset = SlimSet(list(CALIBRATION_PROMPTS[:32]), list(range(32)))
cal = calibrate_pipeline(pipe, slimset, batch_size=8, config=sd.CalibrationConfig(num_timestep_buckets=5),
                         progress=False, **emb.generation_kwargs(num_inference_steps=25))
model = pipe.transformer
for keep in (0.8, 0.6, 0.4):
    plan = __import__("slimdiff_diffusers.core.plan", fromlist=["x"]).plan_slim(model, cal, sd.SlimConfig(keep_ratio=keep))
    print("keep", keep)
    for g in plan.groups:
        if g.kind != "vo" or not g.reader_moments: continue
        site = g.site
        t = g.factors.transform(g.rank)
        readers = {"out": site.out} | ({"add_out": site.add_out} if site.add_out else {})
        for name, path in readers.items():
            G, mu = cal.head_output_moment(path)
            G = G.double(); mu = mu.double()
            W = dict(model.named_modules())[path].weight.detach().double()
            if site.kind == "single": W = W[:, :site.heads * site.head_dim]
            Wh = _out_per_head(W, site.heads)  # (H, dh, d)
            WW = Wh @ Wh.transpose(1, 2)
            eye = torch.eye(t.shape[1], dtype=torch.float64)
            def err(M, C, c_mean=None):
                E = eye - t.double() @ M
                return float(torch.einsum("hij,hjk,hkl,hli->", E.transpose(1, 2), C, E, WW))
            total = float(torch.einsum("hij,hji->", G, WW))
            M0 = reader_refit_maps(t.double(), G)
            e0 = err(M0, G)  # uncentred refit, no intercept: error on second moment
            C = G - mu[:, :, None] * mu[:, None, :]
            M1 = reader_refit_maps(t.double(), C)
            e1 = err(M1, C)  # centred refit + intercept absorbs the mean error exactly
            # SVD factor for reference
            meanfrac = float(torch.einsum("hi,hij,hj->", mu, WW, mu)) / total
            print(f"  {path:45s} r={g.rank}/{g.full_rank} rel err uncentred {e0/total:.5f} centred+intercept {e1/total:.5f} ({(e1/e0-1)*100:+.1f}%) mean energy frac {meanfrac:.3f}")
