"""Split-sum image-based lighting (Karis 2013): the physically based core of near-tiny's shading.

Two cores cannot teach a network how light reflects; the physics is known, so it is computed:

* **Per environment map, once** (`prefilter`, cached by the pipeline like the tokenizer's features): the diffuse
  radiance of a white Lambertian surface, ``E(n) / pi`` (an irradiance map), and a chain of specular maps over
  roughness, each texel ``int L(l) D(h) (n.l) dl / int D(h) (n.l) dl`` with ``n = v = R`` (Karis' assumption). Both are
  brute-force sums over the (downsampled) map: with ``n = v`` the GGX weight depends on ``c = R.l`` alone, so a level is
  one matrix product. The map's own frame is kept (rotation 0, strength 1): rotation and strength apply at lookup, so
  every rotation and strength of one HDRI shares one prefiltered set.
* **The BRDF table** (`brdf_lut`): ``A(n.v, roughness)``, ``B(n.v, roughness)`` with ``E_ss = F0 A + B`` the
  single-scattering directional albedo of GGX with height-correlated Smith masking, integrated by importance sampling.
* **Per Gaussian per frame** (`shade`): Cycles 4.5's Principled BSDF, without shadows:

      F0       = lerp(0.08 * specular_level, base_colour, metallic)    (Specular IOR Level 0.5: IOR 1.5, F0 0.04)
      E_spec   = F0 A + F90 B, plus multiple scattering (Fdez-Aguera 2019: Cycles' multiscatter GGX is on)
      diffuse  = base_colour (1 - metallic) (1 - E_spec(F0 dielectric)) E(n) / pi       (energy-conserving layering)
      specular = E_spec(F0) * prefiltered(dominant direction, roughness)

  The dominant direction leans from the mirror direction towards the normal as roughness grows (Lagarde and de
  Rousiers 2014), which the ``n = v`` prefilter alone gets wrong for rough surfaces seen at an angle.

  Roughness is Blender's (GGX alpha = roughness^2). Fresnel is Schlick's; Cycles uses the exact dielectric Fresnel,
  which differs from Schlick mostly at grazing angles.

Directions are looked up in the map's frame: `IBLLight.to_map` turns the frame the normals live in (an object's asset
space, say) into it, so an object rotated in the world sees its light rotated the other way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .envmap import EnvMap, equirect_solid_angles, rotation_z_matrix, uv_to_direction

__all__ = ["ROUGHNESS_LEVELS", "PrefilteredLight", "IBLLight", "ShadingTerms", "brdf_lut", "prefilter", "shade",
           "reflect"]

#: Roughness of each specular level; level 0 is the mirror (the map itself, box-filtered).
ROUGHNESS_LEVELS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: Rows of each specular level's output map, and of the source it is summed from (lobes wider than a texel).
_LEVEL_ROWS: tuple[tuple[int, int], ...] = ((128, 128), (64, 64), (32, 32), (16, 32), (16, 32), (16, 32))
_IRRADIANCE_ROWS = (16, 32)  # output, source
DIELECTRIC_F0_PER_LEVEL = 0.08  # Cycles: F0 = ((ior - 1) / (ior + 1))^2 * 2 * level, IOR 1.5 -> 0.08 * level


def _texel_directions(height: int) -> np.ndarray:
    """Unit directions [H * 2H, 3] of an equirect map's texel centres (row 0 at the top), in the map's frame."""
    width = 2 * height
    uv = np.stack(np.meshgrid((np.arange(width) + 0.5) / width, 1 - (np.arange(height) + 0.5) / height), -1)
    return uv_to_direction(uv.reshape(-1, 2))


def _ggx_d(cos_h: np.ndarray, alpha: float) -> np.ndarray:
    a2 = alpha * alpha
    return a2 / (math.pi * (cos_h * cos_h * (a2 - 1.0) + 1.0) ** 2)


def _convolve(env: EnvMap, rows: tuple[int, int], weight_of_cosine) -> np.ndarray:
    """[rows_out, 2 rows_out, 3]: each output texel the normalized sum of the source texels weighted by
    `weight_of_cosine(R.l)` and their solid angle (the map's pixels, no rotation or strength)."""
    out_rows, src_rows = rows
    source = EnvMap.from_array(env.pixels, name=env.name).resized(src_rows)
    radiance = source.pixels.reshape(-1, 3).astype(np.float32)
    solid = equirect_solid_angles(source.height, source.width).repeat(source.width).astype(np.float32)
    src_dirs = _texel_directions(source.height).astype(np.float32)
    out_dirs = _texel_directions(out_rows).astype(np.float32)
    result = np.empty((len(out_dirs), 3), dtype=np.float32)
    for start in range(0, len(out_dirs), 2048):  # bounded memory: 2048 x (texels of the source) weights at a time
        cosines = out_dirs[start:start + 2048] @ src_dirs.T
        weights = weight_of_cosine(cosines) * solid
        result[start:start + 2048] = (weights @ radiance) / np.maximum(weights.sum(-1, keepdims=True), 1e-20)
    return result.reshape(out_rows, 2 * out_rows, 3)


@dataclass(frozen=True, eq=False)
class PrefilteredLight:
    """An environment map's lighting terms in its own frame (rotation 0, strength 1), as float32 tensors.

    `diffuse` [h, 2h, 3] is ``E(n) / pi`` (what a white Lambertian surface facing n reflects); `specular[k]`
    [h_k, 2 h_k, 3] the GGX-prefiltered radiance at roughness `ROUGHNESS_LEVELS[k]`.
    """

    diffuse: torch.Tensor
    specular: tuple[torch.Tensor, ...]
    name: str = "envmap"

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "PrefilteredLight":
        return PrefilteredLight(self.diffuse.to(device, dtype), tuple(s.to(device, dtype) for s in self.specular),
                                self.name)


def prefilter(env: EnvMap) -> PrefilteredLight:
    """The diffuse and specular terms of `env`'s image (its rotation and strength are applied at lookup). No level has
    more rows than the map: a small map (a fitted light's, 32 rows) is not blown up to be summed over again."""
    top = max(rows[0] for rows in _LEVEL_ROWS)
    if env.height > top:  # every level is summed from at most this many rows: shrink once (area average)
        env = EnvMap.from_array(EnvMap.from_array(env.pixels, name=env.name).resized(top).pixels, name=env.name)
    at_most = lambda rows: tuple(min(r, env.height) for r in rows)  # noqa: E731 (a small map has no finer detail)
    diffuse = _convolve(env, at_most(_IRRADIANCE_ROWS), lambda c: np.clip(c, 0.0, None))
    levels = []
    for roughness, rows in zip(ROUGHNESS_LEVELS, map(at_most, _LEVEL_ROWS)):
        if roughness == 0.0:
            levels.append(EnvMap.from_array(env.pixels, name=env.name).resized(rows[0]).pixels.copy())
            continue
        alpha = roughness * roughness
        # n = v = R: cos(n, h) = sqrt((1 + R.l) / 2); weight D(h) (n.l), l in the upper hemisphere of R
        levels.append(_convolve(env, rows, lambda c, a=alpha: _ggx_d(np.sqrt(np.clip((1 + c) / 2, 0, 1)), a)
                                * np.clip(c, 0.0, None)))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return PrefilteredLight(as_tensor(diffuse), tuple(as_tensor(level) for level in levels), env.name)


@functools.lru_cache(maxsize=1)
def brdf_lut(size: int = 32, samples: int = 512) -> torch.Tensor:
    """The split-sum table [size (n.v), size (roughness), 2] of (A, B), at texel centres, float32.

    GGX (alpha = roughness^2) with height-correlated Smith masking, importance-sampled with a Hammersley set.
    """
    i = np.arange(samples)
    xi1 = (i + 0.5) / samples
    xi2 = np.array([int(f"{k:032b}"[::-1], 2) / 2.0 ** 32 for k in i])
    n_dot_v = (np.arange(size) + 0.5) / size
    roughness = (np.arange(size) + 0.5) / size
    alpha = (roughness ** 2)[None, :, None]  # [1, R, 1]
    nv = n_dot_v[:, None, None]  # [V, 1, 1]
    v = np.stack([np.sqrt(1 - nv ** 2), np.zeros_like(nv), nv], -1)  # [V, 1, 1, 3]
    cos_t = np.sqrt((1 - xi1) / (1 + (alpha ** 2 - 1) * xi1))  # GGX sampling of h: [1, R, S]
    sin_t = np.sqrt(1 - cos_t ** 2)
    phi = 2 * math.pi * xi2
    h = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], -1)  # [1, R, S, 3]
    v_dot_h = (v * h).sum(-1)  # [V, R, S]
    l_z = 2 * v_dot_h * h[..., 2] - nv  # n.l
    n_dot_h = h[..., 2]

    def smith_lambda(cos: np.ndarray) -> np.ndarray:
        cos = np.clip(cos, 1e-6, 1.0)
        return 0.5 * (np.sqrt(1 + alpha ** 2 * (1 - cos ** 2) / cos ** 2) - 1)

    g = 1.0 / (1.0 + smith_lambda(nv) + smith_lambda(l_z))
    g_vis = np.where(l_z > 0, g * v_dot_h / np.maximum(n_dot_h * nv, 1e-8), 0.0)
    fc = (1 - np.clip(v_dot_h, 0, 1)) ** 5
    table = np.stack([((1 - fc) * g_vis).mean(-1), (fc * g_vis).mean(-1)], -1)
    return torch.from_numpy(table.astype(np.float32))


@dataclass(frozen=True, eq=False)
class IBLLight:
    """What a frame shades with: the prefiltered terms, the rotation [3, 3] from the shading frame into the map's frame
    (`for_frame`), and a strength."""

    prefiltered: PrefilteredLight
    to_map: torch.Tensor
    strength: float = 1.0

    @staticmethod
    def for_frame(prefiltered: PrefilteredLight, rotation_z: float = 0.0,
                  frame_to_world: np.ndarray | None = None, strength: float = 1.0) -> "IBLLight":
        """The light of a map with Mapping Z rotation `rotation_z`, seen from a frame whose directions turn into world
        directions by `frame_to_world` [3, 3] (an object's rotation; identity for the world itself)."""
        rotation = rotation_z_matrix(rotation_z)  # EnvMap.sample: map direction = Rz(rotation) @ world direction
        if frame_to_world is not None:
            linear = np.asarray(frame_to_world, dtype=np.float64)[:3, :3]
            scale = abs(np.linalg.det(linear)) ** (1.0 / 3.0)
            rotation = rotation @ (linear / max(scale, 1e-30))
        return IBLLight(prefiltered, torch.from_numpy(rotation.astype(np.float32)), float(strength))


    def blurred_radiance(self, directions: torch.Tensor) -> torch.Tensor:
        """The light [K, 3] arriving from unit `directions` [K, 3] (shading frame), blurred over a GGX lobe of
        roughness 0.6 (about 20 degrees wide): what each of a coarse set of directions stands for."""
        level = self.prefiltered.specular[ROUGHNESS_LEVELS.index(0.6)].to(directions)
        return _sample_equirect(level, _equirect_coords(directions @ self.to_map.to(directions).T)) * self.strength


def _equirect_coords(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, row) in [0, 1] of unit directions [N, 3] in a map's frame (Cycles' convention: u = 0.5 - atan2(y, x) /
    2 pi, row 0 at +Z). Computed once per direction and shared by every map it is looked up in."""
    # atan2 and acos have infinite or undefined slopes at the poles: keep the lookup a hair away from them
    x = torch.where(directions[:, :2].abs().sum(-1) < 1e-7, torch.full_like(directions[:, 0], 1e-7),
                    directions[:, 0])
    u = 0.5 - torch.atan2(directions[:, 1], x) / (2 * math.pi)
    row = torch.acos(directions[:, 2].clamp(-1.0 + 1e-6, 1.0 - 1e-6)) / math.pi
    return u, row


def _sample_equirect(image: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Bilinear lookup [N, 3] of an equirect image [h, 2h, 3] at `_equirect_coords`, wrapping at the u seam."""
    u, row = coords
    width = image.shape[1]
    padded = torch.cat([image[:, -1:], image, image[:, :1]], 1).permute(2, 0, 1)[None]  # [1, 3, h, w + 2]
    grid = torch.stack([(u * width + 1.0) / (width + 2) * 2 - 1, row * 2 - 1], -1)[None, None].to(image.dtype)
    out = F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def reflect(view: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """The mirror direction [N, 3] of the unit direction to the viewer `view` about the unit `normal`."""
    return 2 * (view * normal).sum(-1, keepdim=True) * normal - view


def _lut(n_dot_v: torch.Tensor, roughness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    table = brdf_lut().to(n_dot_v.device, n_dot_v.dtype).permute(2, 0, 1)[None]  # [1, 2, V, R]
    grid = torch.stack([roughness * 2 - 1, n_dot_v * 2 - 1], -1)[None, None]  # x: roughness (cols), y: n.v (rows)
    ab = F.grid_sample(table, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
    return ab[0][:, None], ab[1][:, None]


def _specular_albedo(f0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, multiscatter: bool = True) -> torch.Tensor:
    """Directional albedo of GGX with multiple scattering (Fdez-Aguera 2019), [N, 3]. The grazing reflectance
    F90 = min(1, 50 F0) fades out with F0, so that Specular IOR Level 0 (IOR 1) reflects nothing, as in Cycles."""
    f90 = (50.0 * f0.mean(-1, keepdim=True)).clamp(max=1.0)
    single = f0 * a + f90 * b
    if not multiscatter:
        return single
    e_ss = a + b
    f_avg = f0 + (1 - f0) / 21.0
    f_ms = single * f_avg / (1 - (1 - e_ss) * f_avg)
    return single + f_ms * (1 - e_ss)


@dataclass(frozen=True)
class ShadingTerms:
    """The PBR radiance of each Gaussian, split so that learned factors can act on each: [N, 3] both."""

    diffuse: torch.Tensor
    specular: torch.Tensor

    @property
    def radiance(self) -> torch.Tensor:
        return self.diffuse + self.specular


def shade(base_color: torch.Tensor, roughness: torch.Tensor, metallic: torch.Tensor, specular_level: torch.Tensor,
          normals: torch.Tensor, view_dirs: torch.Tensor, light: IBLLight, *, multiscatter: bool = True
          ) -> ShadingTerms:
    """Principled-BSDF radiance without shadows (module docstring) for N points: `base_color` [N, 3] (linear),
    `roughness`, `metallic`, `specular_level` [N, 1] (Blender's Specular IOR Level), unit `normals` and unit
    directions to the viewer `view_dirs` [N, 3] in the light's shading frame. Differentiable in every input.
    `multiscatter=False` leaves out the energy GGX loses to multiple scattering (Cycles keeps it)."""
    pre = light.prefiltered
    to_map = light.to_map.to(normals)
    n_dot_v = (normals * view_dirs).sum(-1).clamp(1e-4, 1.0)
    rough = roughness[:, 0].clamp(0.0, 1.0)
    a, b = _lut(n_dot_v, rough)
    f0_dielectric = (DIELECTRIC_F0_PER_LEVEL * specular_level).clamp(0.0, 1.0).expand_as(base_color)
    f0 = torch.lerp(f0_dielectric, base_color, metallic)
    irradiance = _sample_equirect(pre.diffuse.to(normals), _equirect_coords(normals @ to_map.T))
    diffuse = base_color * (1 - metallic) * (1 - _specular_albedo(f0_dielectric, a, b, multiscatter)) * irradiance
    alpha = (rough * rough)[:, None]
    towards_normal = (1 - alpha) * (torch.sqrt((1 - alpha).clamp_min(1e-6)) + alpha)  # Lagarde 2014: a rough lobe leans to the normal
    mirror = _equirect_coords(F.normalize(torch.lerp(normals, reflect(view_dirs, normals), towards_normal), dim=-1)
                              @ to_map.T)
    levels = torch.stack([_sample_equirect(level.to(normals), mirror) for level in pre.specular], 0)  # [K, N, 3]
    position = torch.nan_to_num(rough) * (len(ROUGHNESS_LEVELS) - 1)  # the levels are evenly spaced in roughness
    lower = position.floor().clamp(0, len(ROUGHNESS_LEVELS) - 2)
    t = (position - lower)[:, None]
    index = lower.long()
    rows = torch.arange(len(index), device=index.device)
    prefiltered = levels[index, rows] * (1 - t) + levels[index + 1, rows] * t
    specular = _specular_albedo(f0, a, b, multiscatter) * prefiltered
    return ShadingTerms(diffuse * light.strength, specular * light.strength)
