"""Secret per-layer transforms of an attention block (Llama, Qwen2, Qwen3, Mistral), and the key they derive from.

Pure math: this module imports only torch and the standard library. Row vectors
throughout: q = x W_Q^T, k = x W_K^T, v = x W_V^T (torch's `weight` is [out, in]).
For each KV head h, after the secret head reordering:

    K:  k' = k T_h,          its query heads: q' = q T_h^{-T}    =>  q' k'^T == q k^T
    V:  v' = v A_h,          W_O's input block of each of its query heads gets A_h^{-1}
    mix (runtime, after RoPE): k'' = k' M_h,  q'' = q' M_h^{-T}  =>  q'' k''^T == q k^T
    per-request (runtime): k'' = k' M_rh, q'' = q' M_rh^{-T}; v'' = v' A_rh, o' = o'' A_rh^{-1}

T_h must commute with RoPE. It is the layer's rotary-pair permutation P (valid
only with the layer's cos/sin table permuted the same way: slot i then uses
theta[pairs[i]]) times, per pair slot, c R(phi): the only 2x2 maps that commute
with every rotation. Q gets (1/c) R(phi) = (c R(phi))^{-T}. The pair permutation
is one per layer because the rotary table is shared by all heads of a layer.

    mode         T_h                         A_h                     M_h
    permute      P                           dim permutation         -
    mix-v        P . blockdiag(c R(phi))     dense, non-orthogonal   -
    mix          P . blockdiag(c R(phi))     dense, non-orthogonal   dense, non-orthogonal
    per-request  P . blockdiag(c R(phi))     dense, non-orthogonal   -  (M_rh, A_rh per request r)

With a q/k norm (Qwen3: n = k / rms(k) * w before RoPE, one weight w [d] for all heads),
W_K's rows may only get what passes the norm: an orthogonal map that commutes with
diag(w), i.e. P and a sign per (head, slot): rms(k P S_h) == rms(k), (k P S_h) * (w P) ==
(k * w) P S_h. The rest of T_h moves behind the norm, one per layer: the scale c_i into
the norm weights (k_norm: w P c, q_norm: w P / c) and the angle phi_i into the rotary
table (slot i at position m turns by m theta + phi_i, for q and k alike). So for mix-v,
T_h = P . blockdiag(s_hi c_i R(phi_i)): scale and angle per layer, sign per head.

All material derives from a 32-byte key and the layer index through HMAC-SHA256
and SHAKE-256, so whoever holds the key predicts every transformed weight exactly.
In mode per-request, each request r (or each tenant, named by its cache_salt) also
has a key id; the key and the key id give a 32-byte request seed, which predicts
that request's dense M_rh and A_rh at every layer (and nothing of any other request).

    >>> key = new_key()
    >>> shape = AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)
    >>> lk = derive_layer_key(key, layer=0, shape=shape, mode="mix")
"""

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass

import torch

MODES = ("permute", "mix-v", "mix", "per-request")
KEY_BYTES = 32
KDF_VERSION = b"vllm-kvshield/v1"

# Condition-number bound of every dense matrix (s log-uniform in [1/sqrt(c), sqrt(c)]):
# enough to scramble norms, small enough that bf16 error stays at the level of plain.
DENSE_COND = 4.0
# K's per-pair scale c is log-uniform in [1/PAIR_SCALE, PAIR_SCALE].
PAIR_SCALE = 2.0


def new_key() -> bytes:
    """A fresh key from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def fingerprint(key: bytes) -> str:
    """A short public name of the key: 16 hex digits of a domain-separated SHA-256."""
    return hashlib.sha256(KDF_VERSION + b"/fingerprint\0" + key).hexdigest()[:16]


@dataclass(frozen=True)
class AttentionShape:
    """The attention geometry of one layer (full checkpoint, before TP sharding)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    neox: bool = True  # rotary pairs (i, i + d/2); False: (2i, 2i + 1)
    qk_norm: bool = False  # q and k pass a per-head RMSNorm (one weight [d] each, all heads) before RoPE

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary pairs")

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class LayerKey:
    """Everything one layer's transform needs; indices and matrices are per *new* head."""

    kv_heads: torch.Tensor  # [H_kv] new KV head j holds original KV head kv_heads[j]
    q_heads: torch.Tensor  # [H_q] new query head i holds original query head q_heads[i]
    pairs: torch.Tensor  # [d/2] rotary slot i holds original pair pairs[i]
    k_mat: torch.Tensor  # [H_kv, d, d] T_h, fp64: cached K (after RoPE) = plain K T_h, before the mix
    q_mat: torch.Tensor  # [H_kv, d, d] T_h^{-T}
    v_mat: torch.Tensor  # [H_kv, d, d] A_h
    v_inv: torch.Tensor  # [H_kv, d, d] A_h^{-1}
    mix: torch.Tensor | None  # [H_kv, d, d] M_h (mode "mix")
    mix_q: torch.Tensor | None  # [H_kv, d, d] M_h^{-T}
    # What W_K's / W_Q's rows get: T_h and T_h^{-T} without a q/k norm; P S_h with one.
    k_rows: torch.Tensor | None = None  # [H_kv, d, d]; None: k_mat
    q_rows: torch.Tensor | None = None  # [H_kv, d, d]; None: q_mat
    norm_scale: torch.Tensor | None = None  # [d/2] c_i per slot, into k_norm (q_norm gets 1/c_i)
    rotary_angle: torch.Tensor | None = None  # [d/2] phi_i per slot, into the rotary table

    def __repr__(self) -> str:
        return f"LayerKey(H_kv={len(self.kv_heads)}, d={self.k_mat.shape[-1]}, mix={self.mix is not None})"


# --- key stream ------------------------------------------------------------------------------


def _stream(key: bytes, layer: int, label: str, nbytes: int) -> bytes:
    """nbytes of key stream for (layer, label): HMAC-SHA256 subkey expanded by SHAKE-256."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    info = KDF_VERSION + f"/layer={layer}/{label}".encode()
    subkey = hmac.new(key, info, hashlib.sha256).digest()
    return hashlib.shake_256(subkey).digest(nbytes)


def _uniform(key: bytes, layer: int, label: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform fp64 in the open interval (0, 1), 53 bits each."""
    n = math.prod(shape)
    ints = torch.frombuffer(bytearray(_stream(key, layer, label, 8 * n)), dtype=torch.int64)
    return ((ints & (2**53 - 1)).double() + 0.5).mul_(2.0**-53).reshape(shape)


def _permutation(key: bytes, layer: int, label: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Independent uniform permutations of range(shape[-1]), batched over shape[:-1]."""
    return torch.argsort(_uniform(key, layer, label, shape), dim=-1, stable=True)


def _gaussian(key: bytes, layer: int, label: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal fp64 by Box-Muller."""
    u = _uniform(key, layer, label, (2, *shape))
    return torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])


def haar_orthogonal(gauss: torch.Tensor) -> torch.Tensor:
    """Haar-random orthogonal matrices [..., d, d] from standard normal ones (only their lower triangles are read).

    The Q of a Gaussian's QR, signs fixed so R's diagonal is positive, is Haar. QR builds reflector k from column k
    after reflectors 1..k-1 have turned it, and that part (rows k..d) is again an independent Gaussian (rotation
    invariance), so the reflectors can be built from the Gaussian columns directly (Stewart 1980): LAPACK's
    reflector of x = gauss[k:, k] (beta = -sign(x_0) |x|, tau = (beta - x_0) / beta, v = x / (x_0 - beta) below
    the diagonal), Q = H_1 ... H_d diag(sign(beta)). Same distribution, half the time of the QR.
    """
    below = torch.tril(gauss, -1)
    alpha = torch.diagonal(gauss, dim1=-2, dim2=-1)  # [..., d]
    norm = torch.sqrt(alpha * alpha + (below * below).sum(-2))
    beta = torch.where(alpha >= 0, -norm, norm)
    q = torch.linalg.householder_product(below / (alpha - beta).unsqueeze(-2), (beta - alpha) / beta)
    return q * torch.sign(beta).unsqueeze(-2)


def _orthogonal(key: bytes, layer: int, label: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Haar-random orthogonal matrices [..., d, d] from the key."""
    return haar_orthogonal(_gaussian(key, layer, label, shape))


def _dense(key: bytes, layer: int, label: str, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n dense non-orthogonal d x d matrices U diag(s) W with cond <= DENSE_COND, and their inverses."""
    u = _orthogonal(key, layer, f"{label}/U", (n, d, d))
    w = _orthogonal(key, layer, f"{label}/W", (n, d, d))
    half_log = 0.5 * math.log(DENSE_COND)
    s = torch.exp((2.0 * _uniform(key, layer, f"{label}/s", (n, d)) - 1.0) * half_log)  # [n, d]
    mat = u @ (s.unsqueeze(-1) * w)
    inv = w.transpose(-1, -2) @ (u.transpose(-1, -2) / s.unsqueeze(-1))
    return mat, inv


# --- per-layer material ----------------------------------------------------------------------


def pair_dims(head_dim: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two dims of each rotary pair: neox (i, i + d/2), GPT-J (2i, 2i + 1)."""
    i = torch.arange(head_dim // 2)
    return (i, i + head_dim // 2) if neox else (2 * i, 2 * i + 1)


def _pair_matrices(pairs: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, d: int, neox: bool):
    """T = P . blockdiag(scale R(angle)) and T^{-T} = P . blockdiag(R(angle) / scale), [n, d, d].

    P moves original pair pairs[i] to slot i; scale, angle: [n, d/2] per head and slot.
    """
    n = scale.shape[0]
    a, b = pair_dims(d, neox)
    perm = torch.zeros(d, d, dtype=torch.float64)
    perm[a[pairs], a] = 1.0
    perm[b[pairs], b] = 1.0
    cos, sin = torch.cos(angle), torch.sin(angle)  # [n, d/2]
    k_blocks = torch.zeros(n, d, d, dtype=torch.float64)
    q_blocks = torch.zeros(n, d, d, dtype=torch.float64)
    # row-vector rotation [[cos, sin], [-sin, cos]] on (dim a, dim b) of each slot
    for blocks, c in ((k_blocks, scale), (q_blocks, 1.0 / scale)):
        blocks[:, a, a] = c * cos
        blocks[:, a, b] = c * sin
        blocks[:, b, a] = -c * sin
        blocks[:, b, b] = c * cos
    return perm @ k_blocks, perm @ q_blocks


def _log_pair_scale(key: bytes, layer: int, label: str, shape: tuple[int, ...]) -> torch.Tensor:
    """log c, uniform in [-log PAIR_SCALE, log PAIR_SCALE]."""
    return (2.0 * _uniform(key, layer, label, shape) - 1.0) * math.log(PAIR_SCALE)


def derive_layer_key(key: bytes, layer: int, shape: AttentionShape, mode: str) -> LayerKey:
    """The deterministic secret material of one layer for one mode (per-request: mix-v's, the static part)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    h_kv, g, d = shape.num_kv_heads, shape.group, shape.head_dim
    kv_heads = _permutation(key, layer, "kv_heads", (h_kv,))
    within = _permutation(key, layer, "q_heads", (h_kv, g))  # [H_kv, g]
    q_heads = (kv_heads.unsqueeze(1) * g + within).reshape(-1)
    pairs = _permutation(key, layer, "pairs", (d // 2,))
    k_rows = q_rows = norm_scale = rotary_angle = None

    if mode == "permute":
        ones = torch.ones(h_kv, d // 2, dtype=torch.float64)
        k_mat, q_mat = _pair_matrices(pairs, ones, torch.zeros_like(ones), d, shape.neox)
        dims = _permutation(key, layer, "v_dims", (h_kv, d))  # [H_kv, d]
        v_mat = torch.zeros(h_kv, d, d, dtype=torch.float64)
        v_mat.scatter_(1, dims.unsqueeze(1), 1.0)  # v'[i] = v[dims[i]]
        v_inv = v_mat.transpose(-1, -2).clone()
    elif shape.qk_norm:
        # scale and angle one per layer (behind the shared norm weight and rotary table), sign per head
        norm_scale = torch.exp(_log_pair_scale(key, layer, "norm_pair_scale", (d // 2,)))
        rotary_angle = 2.0 * math.pi * _uniform(key, layer, "rotary_pair_angle", (d // 2,))
        flip = math.pi * (_uniform(key, layer, "pair_sign", (h_kv, d // 2)) < 0.5).double()  # R(pi) = -I
        ones = torch.ones(h_kv, d // 2, dtype=torch.float64)
        k_rows, q_rows = _pair_matrices(pairs, ones, flip, d, shape.neox)
        k_mat, q_mat = _pair_matrices(pairs, norm_scale.expand(h_kv, -1), rotary_angle + flip, d, shape.neox)
        v_mat, v_inv = _dense(key, layer, "v_mix", h_kv, d)
    else:
        log_c = _log_pair_scale(key, layer, "pair_scale", (h_kv, d // 2))
        angle = 2.0 * math.pi * _uniform(key, layer, "pair_angle", (h_kv, d // 2))
        k_mat, q_mat = _pair_matrices(pairs, torch.exp(log_c), angle, d, shape.neox)
        v_mat, v_inv = _dense(key, layer, "v_mix", h_kv, d)

    mix = mix_q = None
    if mode == "mix":
        mix, mix_inv = _dense(key, layer, "qk_mix", h_kv, d)
        mix_q = mix_inv.transpose(-1, -2).contiguous()
    return LayerKey(
        kv_heads, q_heads, pairs, k_mat, q_mat, v_mat, v_inv, mix, mix_q, k_rows, q_rows, norm_scale, rotary_angle
    )


# --- weights ---------------------------------------------------------------------------------

ATTENTION_WEIGHTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
ATTENTION_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias")
QK_NORM_WEIGHTS = ("q_norm.weight", "k_norm.weight")


def required_tensors(shape: AttentionShape) -> tuple[str, ...]:
    """The attention tensors every layer of this shape has (biases are optional)."""
    return ATTENTION_WEIGHTS + (QK_NORM_WEIGHTS if shape.qk_norm else ())


def expected_shapes(shape: AttentionShape) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes of one layer's attention tensors (full, unsharded)."""
    hq, hkv, D = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.hidden_size
    shapes = {
        "q_proj.weight": (hq, D),
        "k_proj.weight": (hkv, D),
        "v_proj.weight": (hkv, D),
        "o_proj.weight": (D, hq),
        "q_proj.bias": (hq,),
        "k_proj.bias": (hkv,),
        "v_proj.bias": (hkv,),
        "o_proj.bias": (D,),
    }
    if shape.qk_norm:
        shapes.update({name: (shape.head_dim,) for name in QK_NORM_WEIGHTS})
    return shapes


def _rows(w: torch.Tensor, heads: torch.Tensor, mats: torch.Tensor, group: int) -> torch.Tensor:
    """Output-side transform: new head i = original head heads[i] times mats[i // group].

    w: [H*d, D] weight or [H*d] bias; (x W^T) T == x (T^T W)^T, and b T for a bias.
    """
    d = mats.shape[-1]
    per_head = w.reshape(len(heads), d, -1)[heads]  # [H, d, D] (D = 1 for a bias)
    mats = mats.repeat_interleave(group, dim=0)  # [H, d, d]
    return (mats.transpose(-1, -2) @ per_head).reshape(w.shape)


def transform_attention(
    tensors: dict[str, torch.Tensor], lk: LayerKey, shape: AttentionShape, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One layer's q/k/v/o weights (and biases) transformed; fp32 math, cast once to dtype.

    Invariant: with the permuted rotary table, attention(x) is unchanged and the
    cached k, v are the plain ones times T_h, A_h.
    """
    shapes = expected_shapes(shape)
    for name, t in tensors.items():
        if name not in shapes:
            raise ValueError(f"unexpected attention tensor {name!r}; accepted: {', '.join(shapes)}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shapes[name]}")
    missing = [n for n in required_tensors(shape) if n not in tensors]
    if missing:
        raise ValueError(f"attention weights missing: {', '.join(missing)}")

    f32 = {n: t.float() for n, t in tensors.items()}
    k_rows = lk.k_mat if lk.k_rows is None else lk.k_rows
    q_rows = lk.q_mat if lk.q_rows is None else lk.q_rows
    k_mat, q_mat, v_mat, v_inv = (m.float() for m in (k_rows, q_rows, lk.v_mat, lk.v_inv))
    out = {}
    for proj, heads, mats, group in (
        ("q_proj", lk.q_heads, q_mat, shape.group),
        ("k_proj", lk.kv_heads, k_mat, 1),
        ("v_proj", lk.kv_heads, v_mat, 1),
    ):
        for kind in ("weight", "bias"):
            name = f"{proj}.{kind}"
            if name in f32:
                out[name] = _rows(f32[name], heads, mats, group)
    # W_O [D, H_q*d]: input block of new head i = W_O block of q_heads[i] times A^{-T}
    d = shape.head_dim
    o = f32["o_proj.weight"].reshape(-1, shape.num_heads, d)[:, lk.q_heads]  # [D, H_q, d]
    inv_t = v_inv.transpose(-1, -2).repeat_interleave(shape.group, dim=0)  # [H_q, d, d]
    out["o_proj.weight"] = torch.einsum("nhd,hde->nhe", o, inv_t).reshape(f32["o_proj.weight"].shape)
    if "o_proj.bias" in f32:
        out["o_proj.bias"] = f32["o_proj.bias"]  # added after the un-mixing: unchanged
    if shape.qk_norm:
        out.update(transform_qk_norm(f32["q_norm.weight"], f32["k_norm.weight"], lk, shape))
    return {n: t.to(dtype).contiguous() for n, t in out.items()}


def transform_qk_norm(
    q_weight: torch.Tensor, k_weight: torch.Tensor, lk: LayerKey, shape: AttentionShape
) -> dict[str, torch.Tensor]:
    """q_norm / k_norm weights [d] for rows transformed by P S_h: permuted like the dims, times c (k) or 1/c (q).

    Invariant: norm(k P S_h; w_k P c) == norm(k; w_k) P S_h diag(c), the same for q with 1/c.
    """
    a, b = pair_dims(shape.head_dim, shape.neox)
    src = torch.empty(shape.head_dim, dtype=torch.long)  # new dim j holds original dim src[j]
    src[a], src[b] = a[lk.pairs], b[lk.pairs]
    scale = torch.ones(shape.head_dim, dtype=torch.float64)
    if lk.norm_scale is not None:
        scale[a], scale[b] = lk.norm_scale, lk.norm_scale
    scale = scale.float()
    return {"q_norm.weight": q_weight[src] / scale, "k_norm.weight": k_weight[src] * scale}


# --- rotary table and runtime mixing ---------------------------------------------------------


def permute_rotary_cache(cos_sin: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """vLLM's [positions, rot_dim] table (cos | sin halves, one column per pair) with slot i using pair pairs[i]."""
    half = cos_sin.shape[-1] // 2
    if len(pairs) != half:
        raise ValueError(f"rotary table has {half} pairs, permutation has {len(pairs)}")
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    return torch.cat((cos[..., pairs], sin[..., pairs]), dim=-1)


def turn_rotary_cache(cos_sin: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """vLLM's [positions, rot_dim] table with slot i turned by angle[i] at every position.

    cos(a + phi), sin(a + phi) from cos a, sin a (fp64 math, so a scaled table such as YaRN's
    stays scaled). q and k both turn by R(phi): q' k'^T == q k^T.
    """
    half = cos_sin.shape[-1] // 2
    if len(angle) != half:
        raise ValueError(f"rotary table has {half} pairs, angle has {len(angle)}")
    cos, sin = cos_sin[..., :half].double(), cos_sin[..., half:].double()
    c, s = torch.cos(angle.double()), torch.sin(angle.double())
    return torch.cat((cos * c - sin * s, sin * c + cos * s), dim=-1).to(cos_sin.dtype)


def shielded_rotary_cache(cos_sin: torch.Tensor, material: "DeviceMaterial") -> torch.Tensor:
    """The layer's own rotary table: pairs permuted, then (with a q/k norm) turned."""
    table = permute_rotary_cache(cos_sin, material.pairs.to(cos_sin.device))
    if material.rotary_angle is not None:
        table = turn_rotary_cache(table, material.rotary_angle.to(cos_sin.device))
    return table


def mix_qk(
    q: torch.Tensor, k: torch.Tensor, mix: torch.Tensor, mix_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runtime mix after RoPE: k'' = k' M_h, q'' = q' M_h^{-T}, so q'' k''^T == q' k'^T.

    q: [T, H_q*d], k: [T, H_kv*d], mix / mix_q: [H_kv, d, d] (this rank's KV heads).
    """
    t = k.shape[0]
    h_kv, d, _ = mix.shape
    k = torch.einsum("thd,hde->the", k.view(t, h_kv, d), mix).reshape(t, h_kv * d)
    q = torch.einsum("thgd,hde->thge", q.view(t, h_kv, -1, d), mix_q).reshape(t, -1)
    return q, k


# --- per-request material ------------------------------------------------------------------

KEY_ID_CHARS = 32  # a kind letter, then hex
TENANT, FRESH = "t", "f"  # key id kinds: a tenant's (from its cache_salt), one request's
NONCE_CHARS = 15  # a fresh key id: "f", an engine's nonce, a counter
COUNTER_CHARS = KEY_ID_CHARS - 1 - NONCE_CHARS


def tenant_key_id(cache_salt: str) -> str:
    """The key id of every request with this cache_salt: a hash, so the salt itself never reaches a worker."""
    return TENANT + hashlib.sha256(KDF_VERSION + b"/key-id\0" + cache_salt.encode()).hexdigest()[: KEY_ID_CHARS - 1]


class FreshKeyIds:
    """Key ids of requests of their own: an engine's random nonce, then a counter.

    Unique for the key's life (the nonce is new at each start, also with a key file), and public:
    a key id's seed is an HMAC under the server key (request_seed), so knowing ids predicts no
    matrix. Counting (not drawing) them lets the enclave expand the next ids' matrices before
    their requests arrive (following_key_ids).

        ids = FreshKeyIds(); ids.next()   # 'f3a9...0000000000000000', then '...0001'
    """

    def __init__(self):
        self.nonce = secrets.token_hex(8)[:NONCE_CHARS]
        self.count = 0

    def next(self) -> str:
        key_id = f"{FRESH}{self.nonce}{self.count:0{COUNTER_CHARS}x}"
        self.count += 1
        return key_id


def is_key_id(key_id) -> bool:
    return (isinstance(key_id, str) and len(key_id) == KEY_ID_CHARS and key_id[0] in (TENANT, FRESH)
            and all(c in "0123456789abcdef" for c in key_id[1:]))


def fresh_engine(key_id: str) -> str | None:
    """The engine part of a fresh key id ("f" and its nonce); None for a tenant's."""
    return key_id[: 1 + NONCE_CHARS] if key_id.startswith(FRESH) else None


def following_key_ids(key_id: str, n: int) -> list[str]:
    """The n fresh key ids an engine hands out after this one; none after a tenant's."""
    head = fresh_engine(key_id)
    if head is None:
        return []
    count = int(key_id[len(head) :], 16)
    return [f"{head}{c:0{COUNTER_CHARS}x}" for c in range(count + 1, min(count + 1 + n, 16**COUNTER_CHARS))]


def request_seed(key: bytes, key_id: str) -> bytes:
    """The 32-byte seed of one key id: predicts that request's (tenant's) matrices and nothing else."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    return hmac.new(key, KDF_VERSION + b"/request-seed\0" + key_id.encode(), hashlib.sha256).digest()


def request_material(seeds: list[bytes], layers, kv_heads, head_dim: int) -> torch.Tensor:
    """Per request, layer and KV head the four runtime matrices, fp32 [N, L, 4, H, d, d]:

        0: M (K after RoPE), 1: M^{-T} (Q), 2: A (V), 3: A^{-1} (attention output)
        k'' = k' M, q'' = q' M^{-T}  =>  q'' k''^T == q' k'^T;   v'' = v' A, o' = o'' A^{-1}

    M = U diag(s) W and A likewise: U, W Haar-orthogonal, s log-uniform in [1/2, 2], so
    cond <= DENSE_COND. Each (request, layer, head) draws from its own generator, seeded with
    64 bits of SHAKE-256(seed, layer, head): a tensor-parallel rank expands only the heads it
    holds. layers, kv_heads: global indices. One batched Householder product for all requests (the cost).
    """
    bad = [len(s) for s in seeds if len(s) != KEY_BYTES]
    if bad or not seeds:
        raise ValueError(f"request seeds must be {KEY_BYTES} bytes each, got lengths {[len(s) for s in seeds]}")
    d = head_dim
    gauss, unif = [], []
    for seed in seeds:
        for layer in layers:
            for head in kv_heads:
                sub = hashlib.shake_256(seed + f"/layer={layer}/head={head}".encode()).digest(8)
                g = torch.Generator().manual_seed(int.from_bytes(sub, "little") & (2**63 - 1))
                gauss.append(torch.randn(4, d, d, generator=g))  # U_K, W_K, U_V, W_V
                unif.append(torch.rand(2, d, generator=g))  # s_K, s_V
    ortho = haar_orthogonal(torch.stack(gauss)).view(-1, 4, d, d)
    s = torch.exp((2.0 * torch.stack(unif) - 1.0) * (0.5 * math.log(DENSE_COND)))  # [N*L*H, 2, d]
    u_k, w_k, u_v, w_v = ortho.unbind(1)
    s_k, s_v = s[:, 0, :, None], s[:, 1, :, None]
    mats = torch.stack(
        (
            u_k @ (s_k * w_k),  # M
            u_k @ (w_k / s_k),  # M^{-T} = U diag(1/s) W
            u_v @ (s_v * w_v),  # A
            w_v.transpose(-1, -2) @ (u_v.transpose(-1, -2) / s_v),  # A^{-1} = W^T diag(1/s) U^T
        ),
        dim=1,
    )  # [N*L*H, 4, d, d]
    return mats.unflatten(0, (len(seeds), len(layers), len(kv_heads))).transpose(2, 3).contiguous()


def predict_cached_kv(k: torch.Tensor, v: torch.Tensor, lk: LayerKey) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached K', V' [T, H_kv, d] the key predicts from plain K (after RoPE) and V [T, H_kv, d].

    k' = k[:, kv_heads] T_h (then M_h in mode "mix"), v' = v[:, kv_heads] A_h; fp64 math, input dtype out.
    """
    k_mat = lk.k_mat if lk.mix is None else lk.k_mat @ lk.mix
    k_out = torch.einsum("thd,hde->the", k[:, lk.kv_heads].double(), k_mat)
    v_out = torch.einsum("thd,hde->the", v[:, lk.kv_heads].double(), lk.v_mat)
    return k_out.to(k.dtype), v_out.to(v.dtype)


# --- the enclave's one call ------------------------------------------------------------------


@dataclass
class DeviceMaterial:
    """What the device must hold to run a shielded layer: derived, never the key."""

    pairs: torch.Tensor  # [d/2] rotary table permutation
    mix: torch.Tensor | None  # [H_kv, d, d] M_h
    mix_q: torch.Tensor | None  # [H_kv, d, d] M_h^{-T}
    rotary_angle: torch.Tensor | None = None  # [d/2] per-slot turn of the rotary table (q/k norm, mix modes)

    def __repr__(self) -> str:
        return (
            f"DeviceMaterial(pairs={len(self.pairs)}, mix={self.mix is not None}, "
            f"turned={self.rotary_angle is not None})"
        )


def shield_layer(
    key: bytes,
    layer: int,
    shape: AttentionShape,
    mode: str,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], DeviceMaterial]:
    """Transform one layer's attention tensors and return the device material it needs."""
    lk = derive_layer_key(key, layer, shape, mode)
    out = transform_attention(tensors, lk, shape, dtype)
    mix = None if lk.mix is None else lk.mix.to(dtype)
    mix_q = None if lk.mix_q is None else lk.mix_q.to(dtype)
    angle = None if lk.rotary_angle is None else lk.rotary_angle.clone()
    return out, DeviceMaterial(lk.pairs.clone(), mix, mix_q, angle)
