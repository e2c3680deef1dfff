"""Triton kernels of the BiLSTM2D GPU engine (see ``triton_lstm``, which imports this module only when needed).

Triton resolves the helpers a kernel calls through the module's globals, so the kernels live in their own
module rather than in a function of ``triton_lstm`` (which must stay importable without triton).
"""

import triton
import triton.language as tl


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1: stable for large |z| (exp overflows to inf -> 0 or 1, never NaN).
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b + acc with fp32 accumulation. UPCAST: multiply in fp32 (exact for bf16 operands), used only under
    TRITON_INTERPRET, whose tl.dot multiplies the raw uint16 bits of bf16 tensors (triton 3.x interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _seq_layout(dir_codes, pid_d, H, W):
    """Where direction ``pid_d``'s sequences live in the flattened B*H*W positions."""
    code = (dir_codes >> (2 * pid_d)) & 3
    axis = code >> 1  # 0: vertical, sequences are columns; 1: horizontal, sequences are rows
    rev = code & 1
    T = H + axis * (W - H)  # sequence length
    S = W + axis * (H - W)  # sequences per image
    stride_s = 1 + axis * (W - 1)  # position step between neighbouring sequences (1 for columns, W for rows)
    stride_t = W + axis * (1 - W)  # position step between time steps (W for columns, 1 for rows)
    return rev, T, S, stride_s, stride_t


@triton.jit
def _load_w_t(w_ptr, d_base, gate, D, offs_k, offs_j, mask_kj):
    """Gate ``gate``'s block of W_hh[d] transposed, as (k, j): element W_hh[d, gate*D + j, k]."""
    ptrs = w_ptr + d_base + (gate * D + offs_j[None, :]) * D + offs_k[:, None]
    return tl.load(ptrs, mask=mask_kj, other=0.0)


@triton.jit
def _load_w(w_ptr, d_base, gate, D, offs_k, offs_j, mask_kj):
    """Gate ``gate``'s block of W_hh[d] as (j, k): element W_hh[d, gate*D + j, k] (for dh = dgate @ W)."""
    ptrs = w_ptr + d_base + (gate * D + offs_k[:, None]) * D + offs_j[None, :]
    return tl.load(ptrs, mask=mask_kj, other=0.0)


@triton.jit
def lstm2d_fwd_kernel(
    gx_ptr,  # B*H*W x NDIR*4D: input projections with both biases (read-only)
    w_ptr,  # NDIR x 4D x D: recurrent weights, in the compute dtype
    y_ptr,  # B*H*W x NDIR*D: h_t of every direction (the block's output layout)
    gates_ptr,  # B*H*W x NDIR*4D: gate activations i, f, g, o, saved for the backward
    c_ptr,  # B*H*W x NDIR*D fp32: cell states, saved for the backward
    B,
    H,
    W,
    D,
    NDIR: tl.constexpr,
    dir_codes,
    SAVE: tl.constexpr,  # False for inference: gates and c are not written
    BLOCK_N: tl.constexpr,  # sequences per program (>= 16 for tl.dot)
    BLOCK_D: tl.constexpr,  # hidden size padded to a power of two >= 16; masks hide the padding
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (parity with the reference); ignored for 16-bit inputs
    UPCAST_DOT: tl.constexpr,  # interpreter workaround for bf16, see _dot
):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    rev, T, S, stride_s, stride_t = _seq_layout(dir_codes, pid_d, H, W)
    N = B * S
    if pid_n * BLOCK_N >= N:  # the other axis has more sequences; nothing to do for this one
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_j = offs_j < D
    mask = mask_n[:, None] & mask_j[None, :]
    mask_kj = (offs_k[:, None] < D) & mask_j[None, :]
    # First position of each sequence, in int64 (B*H*W*NDIR*4D can pass 2**31 at large batch/resolution).
    base = (offs_n // S).to(tl.int64) * H * W + (offs_n % S).to(tl.int64) * stride_s
    g_stride = NDIR * 4 * D
    o_stride = NDIR * D
    g_cols = pid_d * 4 * D + offs_j[None, :]
    o_cols = pid_d * D + offs_j[None, :]
    d_base = pid_d * 4 * D * D

    # W_hh stays in registers for the whole sequence. (Re-reading it from L1/L2 every step was tried: ptxas
    # reports more register spills for that variant at every tile size, not fewer.)
    wi = _load_w_t(w_ptr, d_base, 0, D, offs_k, offs_j, mask_kj)
    wf = _load_w_t(w_ptr, d_base, 1, D, offs_k, offs_j, mask_kj)
    wg = _load_w_t(w_ptr, d_base, 2, D, offs_k, offs_j, mask_kj)
    wo = _load_w_t(w_ptr, d_base, 3, D, offs_k, offs_j, mask_kj)

    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=w_ptr.dtype.element_ty)
    c = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for s in range(0, T):
        t = s + rev * (T - 1 - 2 * s)  # reversed directions walk t = T-1 ... 0
        pos = base + t * stride_t
        g_ptrs = pos[:, None] * g_stride + g_cols
        zi = tl.load(gx_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)
        zf = tl.load(gx_ptr + g_ptrs + D, mask=mask, other=0.0).to(tl.float32)
        zg = tl.load(gx_ptr + g_ptrs + 2 * D, mask=mask, other=0.0).to(tl.float32)
        zo = tl.load(gx_ptr + g_ptrs + 3 * D, mask=mask, other=0.0).to(tl.float32)
        zi = _dot(h, wi, zi, PRECISION, UPCAST_DOT)
        zf = _dot(h, wf, zf, PRECISION, UPCAST_DOT)
        zg = _dot(h, wg, zg, PRECISION, UPCAST_DOT)
        zo = _dot(h, wo, zo, PRECISION, UPCAST_DOT)
        i = _sigmoid(zi)
        f = _sigmoid(zf)
        g = _tanh(zg)
        o = _sigmoid(zo)
        c = f * c + i * g
        h32 = o * _tanh(c)
        h = h32.to(w_ptr.dtype.element_ty)  # padded columns stay 0: their W rows/cols are masked to 0
        o_ptrs = pos[:, None] * o_stride + o_cols
        tl.store(y_ptr + o_ptrs, h32.to(y_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            gt = gates_ptr.dtype.element_ty
            tl.store(gates_ptr + g_ptrs, i.to(gt), mask=mask)
            tl.store(gates_ptr + g_ptrs + D, f.to(gt), mask=mask)
            tl.store(gates_ptr + g_ptrs + 2 * D, g.to(gt), mask=mask)
            tl.store(gates_ptr + g_ptrs + 3 * D, o.to(gt), mask=mask)
            tl.store(c_ptr + o_ptrs, c, mask=mask)


@triton.jit
def lstm2d_bwd_kernel(
    dy_ptr,  # B*H*W x NDIR*D: gradient of y
    gates_ptr,  # B*H*W x NDIR*4D: saved gate activations
    c_ptr,  # B*H*W x NDIR*D fp32: saved cell states
    w_ptr,  # NDIR x 4D x D recurrent weights
    dgx_ptr,  # B*H*W x NDIR*4D: gradient of the gate pre-activations (= of the input projections)
    B,
    H,
    W,
    D,
    NDIR: tl.constexpr,
    dir_codes,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    rev, T, S, stride_s, stride_t = _seq_layout(dir_codes, pid_d, H, W)
    N = B * S
    if pid_n * BLOCK_N >= N:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_D)
    mask_j = offs_j < D
    mask_kj = (offs_k[:, None] < D) & mask_j[None, :]
    mask_n = offs_n < N
    mask = mask_n[:, None] & mask_j[None, :]
    base = (offs_n // S).to(tl.int64) * H * W + (offs_n % S).to(tl.int64) * stride_s
    g_stride = NDIR * 4 * D
    o_stride = NDIR * D
    g_cols = pid_d * 4 * D + offs_j[None, :]
    o_cols = pid_d * D + offs_j[None, :]
    d_base = pid_d * 4 * D * D
    cdt = w_ptr.dtype.element_ty

    wi = _load_w(w_ptr, d_base, 0, D, offs_k, offs_j, mask_kj)
    wf = _load_w(w_ptr, d_base, 1, D, offs_k, offs_j, mask_kj)
    wg = _load_w(w_ptr, d_base, 2, D, offs_k, offs_j, mask_kj)
    wo = _load_w(w_ptr, d_base, 3, D, offs_k, offs_j, mask_kj)
    dh_rec = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # dL/dh_t through step t+1's gates
    dc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # dL/dc_t through c_{t+1}
    for s_rev in range(0, T):
        s = T - 1 - s_rev  # processing order, backwards
        t = s + rev * (T - 1 - 2 * s)
        pos = base + t * stride_t
        has_prev = s > 0
        pos_prev = pos - stride_t + rev * 2 * stride_t  # position of step s-1 (only read if has_prev)
        g_ptrs = pos[:, None] * g_stride + g_cols
        o_ptrs = pos[:, None] * o_stride + o_cols
        op_ptrs = pos_prev[:, None] * o_stride + o_cols
        mask_prev = mask & has_prev

        i = tl.load(gates_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(gates_ptr + g_ptrs + D, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gates_ptr + g_ptrs + 2 * D, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(gates_ptr + g_ptrs + 3 * D, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + o_ptrs, mask=mask, other=0.0)
        c_prev = tl.load(c_ptr + op_ptrs, mask=mask_prev, other=0.0)  # c_{-1} = 0
        dh = tl.load(dy_ptr + o_ptrs, mask=mask, other=0.0).to(tl.float32) + dh_rec

        tc = _tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        dzo = dh * tc * o * (1.0 - o)
        dzi = dc * g * i * (1.0 - i)
        dzf = dc * c_prev * f * (1.0 - f)
        dzg = dc * i * (1.0 - g * g)
        dc = dc * f  # to c_{t-1}
        gt = dgx_ptr.dtype.element_ty
        tl.store(dgx_ptr + g_ptrs, dzi.to(gt), mask=mask)
        tl.store(dgx_ptr + g_ptrs + D, dzf.to(gt), mask=mask)
        tl.store(dgx_ptr + g_ptrs + 2 * D, dzg.to(gt), mask=mask)
        tl.store(dgx_ptr + g_ptrs + 3 * D, dzo.to(gt), mask=mask)

        # z = h_{t-1} @ W^T  =>  dh_{t-1} = dz @ W (padded rows/columns of W are zero). dW = dz^T @ h_{t-1} is
        # not accumulated here (4 fp32 BLOCK_D^2 tiles would not fit in registers at D = 96): torch does it
        # afterwards as one GEMM over all positions, from dgx and the saved output.
        dzi_c = dzi.to(cdt)
        dzf_c = dzf.to(cdt)
        dzg_c = dzg.to(cdt)
        dzo_c = dzo.to(cdt)
        dh_rec = _dot(dzi_c, wi, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), PRECISION, UPCAST_DOT)
        dh_rec = _dot(dzf_c, wf, dh_rec, PRECISION, UPCAST_DOT)
        dh_rec = _dot(dzg_c, wg, dh_rec, PRECISION, UPCAST_DOT)
        dh_rec = _dot(dzo_c, wo, dh_rec, PRECISION, UPCAST_DOT)
