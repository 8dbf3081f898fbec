"""The PyTorch reference: the original code's recipe on the same shapes, threads and dtype.

universal_computation/fpt.py + trainer.py: a Linear input layer (orthogonal init, gain
`orth_gain`, zero bias) + dropout, Hugging Face `GPT2Model(inputs_embeds=...)` with the
frozen groups' `requires_grad=False`, a Linear head on the last token, cross-entropy,
`clip_grad_norm_(model.parameters(), grad_clip)`, `Adam(model.parameters(), lr)` (AdamW
when the config says so), `zero_grad()`, `loss.item()`. bfloat16 runs under
`torch.autocast`. Only with torch and transformers installed.

The Llama family (llama, mistral, qwen2) runs the same recipe around `transformers`'
LlamaModel / MistralModel / Qwen2Model, with FPT's learned position table (zeros, added to
the input, as models/llama.py) as a parameter of the reference.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from fpt_jax import build, freeze
from fpt_jax.bench.core import Bench, Case, Runner, timed
from fpt_jax.models import backbones
from fpt_jax.tasks.base import Batch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device_for(backend: str) -> str | None:
    """Where the reference runs: the CPU next to a CPU backend, CUDA next to a GPU; none
    next to a TPU (a host-CPU reference says nothing about the TPU)."""
    if not torch_available():
        return None
    import torch
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    return None


def unsupported(bc: Bench) -> str | None:
    """Why the reference cannot run the base config's recipe, or None."""
    cfg = bc.base
    if cfg.in_layer_sizes or cfg.out_layer_sizes or cfg.grad_accum > 1:
        return "the reference recipe has no in/out layer MLPs and no gradient accumulation"
    if backbones.family_of(bc.backbone()).name not in ("gpt2", *_LLAMA_MODELS):
        return ("the reference recipe (the original code) has a GPT-2 backbone; a "
                f"Llama-family one here too ({', '.join(_LLAMA_MODELS)})")
    return None


# A Llama-family backbone's `transformers` model class (its config class is `<name>Config`).
_LLAMA_MODELS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _param_path(name: str, family: backbones.Family) -> tuple[str, ...] | None:
    """The fpt-jax path of a parameter of the reference model (None: the unused `wte`)."""
    if name.startswith("in_net."):
        return ("input",)
    if name.startswith("out_net."):
        return ("output",)
    if name == "positions":
        return ("transformer", "input_positions", "embedding")
    name = name.removeprefix("sequence_model.")
    if family.name != "gpt2":
        path = family.torch_name_to_path(name)
        return None if path is None else ("transformer", *path)
    parts = name.split(".")
    if parts[0] == "wte":
        return None
    if parts[0] == "h":
        return ("transformer", f"h_{parts[1]}", *parts[2:])
    return ("transformer", *parts)


def _hf_backbone(gcfg: Any, cfg: Any, attn: str | None):
    """The `transformers` model of the backbone config `gcfg` (random init)."""
    import transformers
    extra = {"attn_implementation": attn} if attn else {}
    family = backbones.family_of(gcfg).name
    if family == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(
            n_layer=gcfg.n_layer, n_head=gcfg.n_head, n_embd=gcfg.n_embd,
            n_positions=gcfg.n_positions, vocab_size=gcfg.vocab_size,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **extra))
    kind = _LLAMA_MODELS[family]
    hf = {k: v for k, v in gcfg.to_hf().items() if k not in ("model_type", "n_positions")}
    config = getattr(transformers, f"{kind}Config")(**hf, **extra)
    return getattr(transformers, f"{kind}Model")(config)


class TorchRunner(Runner):
    framework = "torch"

    def __init__(self, bc: Bench, case: Case, batches: Sequence[Batch],
                 device: str = "cpu"):
        if case.model is not None:
            raise ValueError(f"case {case.label}: the reference is the original GPT-2 recipe; "
                             "a baseline's case has none")
        import torch
        from torch import nn
        super().__init__(case)
        self.torch, self.device = torch, device
        cfg = bc.train_config(case)
        if bc.settings.torch_threads:
            torch.set_num_threads(bc.settings.torch_threads)
        torch.manual_seed(cfg.seed)
        gcfg, _ = build.backbone(cfg)
        family = backbones.family_of(gcfg)
        learned_positions = family.name != "gpt2"  # FPT's table (GPT-2 has its own wpe)
        shape = case.shape

        class Reference(nn.Module):
            def __init__(self):
                super().__init__()
                proj = nn.Linear(shape.features, gcfg.n_embd)
                if cfg.orth_gain is not None:
                    nn.init.orthogonal_(proj.weight, gain=cfg.orth_gain)
                    proj.bias.data.zero_()
                self.in_net = nn.Sequential(proj, nn.Dropout(cfg.dropout))
                self.sequence_model = _hf_backbone(gcfg, cfg, bc.settings.torch_attn)
                if learned_positions:
                    self.positions = nn.Parameter(torch.zeros(gcfg.n_positions, gcfg.n_embd))
                self.out_net = nn.Linear(gcfg.n_embd, shape.classes)

            def forward(self, x):
                embedded = self.in_net(x)
                if learned_positions:  # its first rows, as the JAX model reads them
                    embedded = embedded + self.positions[:embedded.shape[1]]
                h = self.sequence_model(inputs_embeds=embedded,
                                        return_dict=True).last_hidden_state
                return self.out_net(h[:, -1])

        self.model = Reference().to(device)
        self.attn_implementation = getattr(self.model.sequence_model.config,
                                           "_attn_implementation", None)
        selection = (freeze.parse_selection(case.trainable, gcfg.n_layer)
                     if case.trainable else None)
        for name, p in self.model.named_parameters():
            path = _param_path(name, family)
            p.requires_grad = bool(selection and path is not None
                                   and selection.is_trainable(*freeze.param_group(path)))
        self.trainable_params = sum(p.numel() for p in self.model.parameters()
                                    if p.requires_grad)
        params = self.model.parameters()
        self.optim = (torch.optim.Adam(params, lr=cfg.learning_rate) if cfg.optimizer == "adam"
                      else torch.optim.AdamW(params, lr=cfg.learning_rate,
                                             weight_decay=cfg.weight_decay))
        self.grad_clip = cfg.grad_clip
        self.loss_fn = nn.CrossEntropyLoss()
        self.batches = [(torch.from_numpy(np.asarray(b["x"])).to(device),
                         torch.from_numpy(np.asarray(b["y"]).astype(np.int64)).to(device))
                        for b in batches]
        self.autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                         if case.dtype == "bfloat16" else contextlib.nullcontext())
        self.i = 0

    def _sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _step(self, x, y) -> float:
        torch = self.torch
        if self.case.trainable is None:
            self.model.eval()
            with torch.inference_mode(), self.autocast:
                return self.loss_fn(self.model(x).float(), y).item()
        self.model.train()
        with self.autocast:
            loss = self.loss_fn(self.model(x).float(), y)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optim.step()
        self.optim.zero_grad()
        return loss.item()

    def run_step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        self._sync()
        dt = timed(lambda: (self._step(x, y), self._sync()))
        self.i += 1
        return dt

    def result(self) -> dict[str, Any]:
        out = super().result()
        out.update({"device": self.device, "threads": self.torch.get_num_threads(),
                    "attn_implementation": self.attn_implementation,
                    "trainable_params": self.trainable_params})
        return out
