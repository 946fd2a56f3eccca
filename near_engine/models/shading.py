"""The shading MLP: a Gaussian's colour feature f and its normal -> HDR radiance plus auxiliary channels.

This is NeAR's `NeuralBasis` (`trellis/models/structured_latent_vae/neural_sh.py` in Luh1124/NeAR), written anew with
the same parameter names, so that an official `neural_basis.safetensors` loads unchanged:

- input: ``[f, nerf_encoding(normalize(normal), 6 frequencies, include_input)]`` -> ``input_dim + 39`` channels
  (``input_dim`` alone when ``use_normal`` is False);
- ``mlp``: ``Linear, act, (Linear, act) * (num_layers - 2), Linear`` in one ``nn.Sequential``; activations hold no
  parameters, so the weights are ``mlp.0``, ``mlp.2``, ... ``mlp.{2 (num_layers - 1)}`` (with ``dropout_rate > 0`` each
  activation is followed by a Dropout, which shifts the indices exactly as in the reference);
- output: ``ELU(alpha=1e-3)`` on channels 0..2 (HDR radiance, >= -0.001) and a sigmoid on the rest. The reference
  renderer reads channel 3 as "brightness" and channel 4 as "nush1", so the official checkpoint has ``output_dim >= 5``.

The activation is configurable: the code default is ``'sine'`` = ``sin(w0 * x)`` with ``w0 = 30`` after *every* hidden
Linear (including the first), the paper says ReLU; ``'silu'`` and ``'gelu'`` are also accepted, as in the reference.

**The physically based core** (``core="pbr"``, near-tiny): the MLP no longer makes radiance from nothing. It is given
each Gaussian's split-sum PBR terms (`near_engine.ibl.shade`: diffuse D and specular S under the environment map, no
shadows) and learns only what they miss: a diffuse and a specular visibility factor (shadowing, specular occlusion)
and an additive term (interreflection), ``rgb = D * 2 sigmoid(o0) + S * 2 sigmoid(o1) + o[2:5]``. Its last layer
starts at zero, so an untrained MLP renders exactly like a PBR shader with the predicted materials. Outputs 0-2 are
then that radiance, 3 the diffuse factor / 2 (a shadow pass in [0, 1]) and 4 the specular factor / 2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import nerf_encoding, nerf_encoding_dim

if TYPE_CHECKING:
    from ..ibl import ShadingTerms

NORMAL_FREQUENCIES = 6  # the reference hard-codes 6 frequencies for the normal, whatever `num_frequencies` says


class Sine(nn.Module):
    """SIREN activation ``sin(w0 * x)``."""

    def __init__(self, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class _ResidualBlock(nn.Module):
    """``act(linear2(act(linear1(x))) + x)``: the reference's residual hidden block (keys ``linear1``/``linear2``)."""

    def __init__(self, dim: int, activation: nn.Module, dropout_rate: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.linear1(x))
        if self.dropout is not None:
            y = self.dropout(y)
        return self.activation(self.linear2(y) + x)


def _make_activation(name: str, w0: float) -> nn.Module:
    if name == "sine":
        return Sine(w0)
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unsupported shading MLP activation {name!r}; expected 'sine', 'relu', 'silu' or 'gelu'")


class ShadingMLP(nn.Module):
    """NeAR's `NeuralBasis`. Constructor arguments and defaults follow the reference, except ``input_dim=32`` and
    ``output_dim=5``, which is what the shipped renderer feeds and reads (reference defaults 48 and 4).

    ``forward(features [..., input_dim], normals [..., 3]) -> [..., output_dim]``; normals need not be unit length
    (they are normalized, as in the reference). ``num_frequencies`` is accepted and ignored, as in the reference.
    """

    def __init__(
        self,
        input_dim: int = 32,
        output_dim: int = 5,
        hidden_dim: int = 64,
        num_layers: int = 3,
        num_frequencies: int = 6,
        activation: str = "sine",
        w0: float = 30.0,
        dropout_rate: float = 0.0,
        use_normal: bool = True,
        normal_dim: int = 3,
        use_residual: bool = False,
        pretrained_path: None = None,
        core: str = "none",
    ) -> None:
        super().__init__()
        if core not in ("none", "pbr"):
            raise ValueError(f"shading core must be 'none' or 'pbr', got {core!r}")
        if core == "pbr" and output_dim != 5:
            raise ValueError(f"the PBR core's MLP has 5 outputs (2 factors, 3 additive), got {output_dim}")
        self.core = core
        if pretrained_path is not None:
            raise ValueError("ShadingMLP does not load weights itself (no pickle); use near_engine.checkpoints")
        if num_layers < 2:
            raise ValueError(f"the shading MLP needs at least 2 layers, got {num_layers}")
        if output_dim < 3:
            raise ValueError(f"the shading MLP needs at least 3 outputs (RGB), got {output_dim}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.use_normal = use_normal
        self.normal_dim = normal_dim
        self.use_residual = use_residual
        self.activation_type = activation
        self.w0 = float(w0)
        self.activation = _make_activation(activation, w0)  # one shared, parameter-free module, as in the reference

        in_dim = input_dim + (nerf_encoding_dim(normal_dim, NORMAL_FREQUENCIES) if use_normal else 0)
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), self.activation]
        if dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
        for i in range(num_layers - 2):
            if use_residual and i > 0:
                layers.append(_ResidualBlock(hidden_dim, self.activation, dropout_rate))
            else:
                layers += [nn.Linear(hidden_dim, hidden_dim), self.activation]
                if dropout_rate > 0:
                    layers.append(nn.Dropout(dropout_rate))
        layers.append(nn.Linear(hidden_dim, output_dim))
        self.mlp = nn.Sequential(*layers)
        self.reset_parameters()
        if core == "pbr" and not self.mlp[-1].weight.is_meta:  # identity at first: the plain PBR shader
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation. Sine: first Linear W ~ U(+-1/fan_in); later ones W ~ U(+-sqrt(6/fan_in)/w0);
        every bias ~ U(+-1/fan_in). Other activations: Xavier-uniform weights, zero biases."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        if any(p.is_meta for p in self.parameters()):
            return
        for index, linear in enumerate(linears):
            fan_in = linear.weight.shape[-1]
            if self.activation_type == "sine":
                bound = 1.0 / fan_in if index == 0 else math.sqrt(6.0 / fan_in) / self.w0
                linear.weight.uniform_(-bound, bound)
                linear.bias.uniform_(-1.0 / fan_in, 1.0 / fan_in)
            else:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def encode_inputs(self, features: torch.Tensor, normals: torch.Tensor | None) -> torch.Tensor:
        """The MLP's input: ``features`` alone, or ``[features, nerf_encoding(normalize(normals), 6)]``."""
        if features.shape[-1] != self.input_dim:
            raise ValueError(f"expected {self.input_dim} feature channels, got {tuple(features.shape)}")
        if not self.use_normal:
            return features
        if normals is None or normals.shape[-1] != self.normal_dim or normals.shape[:-1] != features.shape[:-1]:
            got = None if normals is None else tuple(normals.shape)
            raise ValueError(f"this shading MLP needs normals [..., {self.normal_dim}] matching the features' batch "
                             f"shape {tuple(features.shape[:-1])}, got {got}")
        unit = F.normalize(normals, p=2, dim=-1)
        return torch.cat([features, nerf_encoding(unit, NORMAL_FREQUENCIES, include_input=True)], dim=-1)

    def forward(self, features: torch.Tensor, normals: torch.Tensor | None = None,
                terms: "ShadingTerms | None" = None) -> torch.Tensor:
        """[..., output_dim]; with the PBR core, `terms` (`ibl.ShadingTerms`, [N, 3] each) are required."""
        out = self.mlp(self.encode_inputs(features, normals))
        if self.core == "none":
            return torch.cat([F.elu(out[..., :3], alpha=1e-3), torch.sigmoid(out[..., 3:])], dim=-1)
        if terms is None:
            raise ValueError("this shading MLP has a PBR core: it needs the PBR terms of each Gaussian")
        diffuse_factor, specular_factor = 2 * torch.sigmoid(out[..., 0:1]), 2 * torch.sigmoid(out[..., 1:2])
        rgb = terms.diffuse * diffuse_factor + terms.specular * specular_factor + out[..., 2:5]
        return torch.cat([rgb, diffuse_factor / 2, specular_factor / 2], dim=-1)
