"""Triton kernels of the GPU engine: the BiLSTM2D recurrence (``triton_lstm``) and LayerNorm (``layer_norm``);
both import this module only when needed.

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
def _tile(pid_d, pid_n, N, S, stride_s, H, W, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (direction ``pid_d``, tile ``pid_n``)'s indices, shared by the forward and backward kernels:
    hidden-unit offsets (j: output, k: input), the (sequence, unit) mask, the W_hh mask, the first position of
    each of its sequences, and its direction's columns in the gate (4D-wide) and output (D-wide) slices."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_D)
    mask_j = offs_j < D
    mask_kj = (offs_k[:, None] < D) & mask_j[None, :]
    mask = (offs_n < N)[:, None] & mask_j[None, :]
    # In int64: B*H*W*NDIR*4D can pass 2**31 at large batch/resolution.
    base = (offs_n // S).to(tl.int64) * H * W + (offs_n % S).to(tl.int64) * stride_s
    g_cols = pid_d * 4 * D + offs_j[None, :]
    o_cols = pid_d * D + offs_j[None, :]
    return offs_j, offs_k, mask, mask_kj, base, g_cols, o_cols


@triton.jit
def _load_gx(gx_ptr, base, rev, T, stride_t, s, g_stride, g_cols, D, mask):
    """The four gate projections (fp32) of step ``s`` of each sequence in the tile."""
    t = s + rev * (T - 1 - 2 * s)
    g_ptrs = (base + t * stride_t)[:, None] * g_stride + g_cols
    zi = tl.load(gx_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)
    zf = tl.load(gx_ptr + g_ptrs + D, mask=mask, other=0.0).to(tl.float32)
    zg = tl.load(gx_ptr + g_ptrs + 2 * D, mask=mask, other=0.0).to(tl.float32)
    zo = tl.load(gx_ptr + g_ptrs + 3 * D, mask=mask, other=0.0).to(tl.float32)
    return zi, zf, zg, zo


@triton.jit
def _load_bwd_step(gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, g_cols, o_cols, D, s, mask):
    """What the backward reads at step ``s``: gate activations, dL/dy and c_{s-1} (0 before the first step)."""
    t = s + rev * (T - 1 - 2 * s)
    pos = base + t * stride_t
    g_ptrs = pos[:, None] * g_stride + g_cols
    i = tl.load(gates_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(gates_ptr + g_ptrs + D, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gates_ptr + g_ptrs + 2 * D, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(gates_ptr + g_ptrs + 3 * D, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + pos[:, None] * o_stride + o_cols, mask=mask, other=0.0).to(tl.float32)
    pos_prev = pos - stride_t + rev * 2 * stride_t
    c_prev = tl.load(c_ptr + pos_prev[:, None] * o_stride + o_cols, mask=mask & (s > 0), other=0.0)
    return i, f, g, o, dy, c_prev


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
    PREFETCH: tl.constexpr,  # load step s+1's inputs during step s (see the loop)
):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    rev, T, S, stride_s, stride_t = _seq_layout(dir_codes, pid_d, H, W)
    N = B * S
    if pid_n * BLOCK_N >= N:  # the other axis has more sequences; nothing to do for this one
        return

    offs_j, offs_k, mask, mask_kj, base, g_cols, o_cols = _tile(pid_d, pid_n, N, S, stride_s, H, W, D, BLOCK_N, BLOCK_D)
    g_stride = NDIR * 4 * D
    o_stride = NDIR * D
    d_base = pid_d * 4 * D * D

    # W_hh stays on chip for the whole sequence (ptxas: in shared memory, 136-148 KiB at BLOCK_D = 128).
    # Re-reading it from L1/L2 every step was tried: ptxas reports more register spills for that variant.
    wi = _load_w_t(w_ptr, d_base, 0, D, offs_k, offs_j, mask_kj)
    wf = _load_w_t(w_ptr, d_base, 1, D, offs_k, offs_j, mask_kj)
    wg = _load_w_t(w_ptr, d_base, 2, D, offs_k, offs_j, mask_kj)
    wo = _load_w_t(w_ptr, d_base, 3, D, offs_k, offs_j, mask_kj)

    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=w_ptr.dtype.element_ty)
    c = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # PREFETCH: step s+1's projections are loaded while step s computes (they do not depend on h), so the
    # serial chain per step is dot -> gates -> store instead of load -> dot -> gates -> store.
    if PREFETCH:
        zi, zf, zg, zo = _load_gx(gx_ptr, base, rev, T, stride_t, 0, g_stride, g_cols, D, mask)
    for s in range(0, T):
        t = s + rev * (T - 1 - 2 * s)  # reversed directions walk t = T-1 ... 0
        pos = base + t * stride_t
        if PREFETCH:
            nzi, nzf, nzg, nzo = _load_gx(
                gx_ptr, base, rev, T, stride_t, s + 1, g_stride, g_cols, D, mask & (s + 1 < T)
            )
        else:
            zi, zf, zg, zo = _load_gx(gx_ptr, base, rev, T, stride_t, s, g_stride, g_cols, D, mask)
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
            g_ptrs = pos[:, None] * g_stride + g_cols
            gt = gates_ptr.dtype.element_ty
            tl.store(gates_ptr + g_ptrs, i.to(gt), mask=mask)
            tl.store(gates_ptr + g_ptrs + D, f.to(gt), mask=mask)
            tl.store(gates_ptr + g_ptrs + 2 * D, g.to(gt), mask=mask)
            tl.store(gates_ptr + g_ptrs + 3 * D, o.to(gt), mask=mask)
            tl.store(c_ptr + o_ptrs, c, mask=mask)
        if PREFETCH:
            zi, zf, zg, zo = nzi, nzf, nzg, nzo


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
    PREFETCH: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    rev, T, S, stride_s, stride_t = _seq_layout(dir_codes, pid_d, H, W)
    N = B * S
    if pid_n * BLOCK_N >= N:
        return

    offs_j, offs_k, mask, mask_kj, base, g_cols, o_cols = _tile(pid_d, pid_n, N, S, stride_s, H, W, D, BLOCK_N, BLOCK_D)
    g_stride = NDIR * 4 * D
    o_stride = NDIR * D
    d_base = pid_d * 4 * D * D
    cdt = w_ptr.dtype.element_ty

    wi = _load_w(w_ptr, d_base, 0, D, offs_k, offs_j, mask_kj)
    wf = _load_w(w_ptr, d_base, 1, D, offs_k, offs_j, mask_kj)
    wg = _load_w(w_ptr, d_base, 2, D, offs_k, offs_j, mask_kj)
    wo = _load_w(w_ptr, d_base, 3, D, offs_k, offs_j, mask_kj)
    dh_rec = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # dL/dh_t through step t+1's gates
    dc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # dL/dc_t through c_{t+1}
    # c_t of each step is the previous iteration's c_{t-1}: one cell-state load per step, not two.
    t_last = (T - 1) * (1 - rev)
    c = tl.load(c_ptr + (base + t_last * stride_t)[:, None] * o_stride + o_cols, mask=mask, other=0.0)
    if PREFETCH:  # as in the forward: step s-1's loads are issued while step s computes
        i, f, g, o, dy, c_prev = _load_bwd_step(
            gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, g_cols, o_cols, D, T - 1, mask
        )
    for s_rev in range(0, T):
        s = T - 1 - s_rev  # processing order, backwards
        t = s + rev * (T - 1 - 2 * s)
        pos = base + t * stride_t
        g_ptrs = pos[:, None] * g_stride + g_cols
        if PREFETCH:
            m_next = mask & (s > 0)
            ni, nf, ng, no, ndy, nc_prev = _load_bwd_step(
                gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, g_cols, o_cols, D, s - 1, m_next
            )
        else:
            i, f, g, o, dy, c_prev = _load_bwd_step(
                gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, g_cols, o_cols, D, s, mask
            )
        dh = dy + dh_rec

        tc = _tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        dzo = dh * tc * o * (1.0 - o)
        dzi = dc * g * i * (1.0 - i)
        dzf = dc * c_prev * f * (1.0 - f)
        dzg = dc * i * (1.0 - g * g)
        dc = dc * f  # to c_{t-1}
        c = c_prev
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
        if PREFETCH:
            i, f, g, o, dy, c_prev = ni, nf, ng, no, ndy, nc_prev


@triton.jit
def layer_norm_fwd_kernel(
    x_ptr,  # M x C, contiguous
    w_ptr,  # C
    b_ptr,  # C
    y_ptr,  # M x C, in the output dtype (the autocast dtype under autocast)
    mean_ptr,  # M fp32, for the backward
    rstd_ptr,  # M fp32
    M,
    C,
    eps,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # C padded to a power of two
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_r = rows < M
    mask_c = cols < C
    mask = mask_r[:, None] & mask_c[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)
