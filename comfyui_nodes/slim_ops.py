"""ComfyUI operations for loading a slim model through ComfyUI's own loader (ComfyUI-GGUF style).

``comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": SlimOps})`` builds the
stock UNet of the detected model family with these operations instead of the ones ComfyUI would pick. The
only difference is :class:`SlimOps.Linear`: it allocates nothing when constructed and takes its shape from
the tensors it loads, so the narrowed attention / feed-forward layers of a slim file load into the stock
module tree without our code rebuilding it, and no dense weight is ever allocated for them.

Why ``manual_cast`` as the base: ComfyUI chooses its operations class (``comfy.ops.pick_operations``) only
when no custom one is given, from the weight and compute dtypes it decides *inside* the loader. A custom class
is chosen before that, so it must be right for every combination. ``manual_cast`` casts weights to the
input's dtype and device at each call; when they already match (fp32 on CPU, fp16 weights with fp16 compute)
``comfy.model_management.cast_to`` returns the same tensor, so results are identical to the stock
``disable_weight_init`` layers. ComfyUI-GGUF's ``GGMLOps`` derives from ``manual_cast`` for the same reason.
Partial ("lowvram"/"novram") loading works as for any ComfyUI layer: ``ModelPatcher`` sets
``comfy_cast_weights``/``weight_function`` on these modules and their forward goes through the cast path.
"""
from __future__ import annotations

import torch

import comfy.ops


class SlimOps(comfy.ops.manual_cast):
    """ComfyUI's ``manual_cast`` operations with a Linear whose shape comes from the state dict."""

    class Linear(comfy.ops.manual_cast.Linear):
        """A Linear that is sized by ``load_state_dict``: ``in_features``/``out_features`` given to the
        constructor are only the stock model's defaults; the loaded ``weight`` decides.

        Until weights are loaded, ``weight`` (and ``bias``) are None. A key absent from the state dict is
        reported in ``missing_keys`` like any module does; the SlimDiff loader treats that as an error.
        """

        def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            self.slim_has_bias = bias
            # The stock layer would be created on this device with this dtype; loaded tensors are converted the
            # same way load_state_dict's copy_ into a stock parameter converts them.
            self.slim_factory = {"device": device, "dtype": dtype}
            self.register_buffer("slim_in_index", None, persistent=False)
            self.register_buffer("slim_out_index", None, persistent=False)
            self.slim_full_out: int | None = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs) -> None:
            dtype = self.slim_factory["dtype"] or torch.get_default_dtype()
            device = self.slim_factory["device"]
            for name, wanted in (("weight", True), ("bias", self.slim_has_bias)):
                key = prefix + name
                if key not in state_dict:
                    if wanted:
                        missing_keys.append(key)
                    continue
                if not wanted:
                    unexpected_keys.append(key)
                    continue
                # A copy, as load_state_dict's copy_ into a stock parameter makes: a tensor of a loaded file may sit
                # at an unaligned offset of the file's buffer, where CPU BLAS kernels round differently, and the
                # model would then not compute bit-identically to the one the file was saved from.
                tensor = state_dict[key].to(device=device if device is not None else state_dict[key].device,
                                            dtype=dtype, copy=True)
                setattr(self, name, torch.nn.Parameter(tensor, requires_grad=False))
            if self.weight is not None:
                self.out_features, self.in_features = self.weight.shape
                self._check_layout()

        # -- fused layers of transformer families (Flux, SD3, PixArt) --------------------------------------

        def set_slim_layout(self, in_index: torch.Tensor | None, out_index: torch.Tensor | None,
                            full_out: int | None) -> None:
            """Make a narrowed layer stand in for a full-width one inside ComfyUI's own block code.

            ``in_index``: the input columns this layer reads (a consumer such as ``proj``/``linear2``/``proj_out``
            whose input carries zero channels where values or MLP units were dropped). ``out_index`` and
            ``full_out``: the layer's rows are scattered to these positions of a ``full_out``-wide output, zeros
            elsewhere (a fused ``qkv``/``linear1``/``kv_linear`` that ComfyUI splits by fixed sizes). Zero value
            channels change no attention output, zero MLP units stay zero through GELU, and q/k keep their
            width, so the softmax scale is the original one (docs/architecture.md, "ComfyUI transformer
            families"). Index buffers are not persistent: the state dict keeps ComfyUI's key names and shapes.
            """
            self.slim_in_index = None if in_index is None else in_index.long()
            self.slim_out_index = None if out_index is None else out_index.long()
            self.slim_full_out = full_out
            self._check_layout()

        def _check_layout(self) -> None:
            if self.weight is None:
                return
            if self.slim_in_index is not None and len(self.slim_in_index) != self.weight.shape[1]:
                raise ValueError(f"slim layout: {len(self.slim_in_index)} input columns for a weight of "
                                 f"{self.weight.shape[1]}")
            if self.slim_out_index is not None and len(self.slim_out_index) != self.weight.shape[0]:
                raise ValueError(f"slim layout: {len(self.slim_out_index)} output rows for a weight of "
                                 f"{self.weight.shape[0]}")

        def forward(self, input, *args, **kwargs):
            if self.slim_in_index is not None:
                input = input.index_select(-1, self.slim_in_index.to(input.device))
            out = super().forward(input, *args, **kwargs)
            if self.slim_out_index is None:
                return out
            full = out.new_zeros(*out.shape[:-1], self.slim_full_out)
            return full.index_copy_(full.dim() - 1, self.slim_out_index.to(out.device), out)
