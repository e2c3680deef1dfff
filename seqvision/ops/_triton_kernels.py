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
def _tile(pid_n, N, S, stride_s, H, W, BLOCK_N: tl.constexpr):
    """Program ``pid_n``'s tile of sequences: which of them exist, and the position of each one's first element."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # In int64: B*H*W*NDIR*4D can pass 2**31 at large batch/resolution.
    base = (offs_n // S).to(tl.int64) * H * W + (offs_n % S).to(tl.int64) * stride_s
    return offs_n < N, base


@triton.jit
def _piece(pid_d, start, D, live, BLOCK: tl.constexpr):
    """A piece of the hidden state: units ``start`` .. ``start + BLOCK - 1``, which of them exist (< D), the
    (sequence, unit) mask, and direction ``pid_d``'s columns for them in the gate (4D per direction; add
    gate * D) and output (D per direction) slices."""
    j = start + tl.arange(0, BLOCK)
    exists = j < D
    mask = live[:, None] & exists[None, :]
    return j, exists, mask, pid_d * 4 * D + j[None, :], pid_d * D + j[None, :]


@triton.jit
def _load_w_t(w_ptr, d_base, D, k, mask_k, j, mask_j):
    """The four gate blocks of W_hh[d] that map hidden units ``k`` to gate units ``j``, as (k, j) tiles:
    element W_hh[d, gate*D + j, k] (for z = h @ W^T). Missing units read as 0."""
    # Each gate's addresses written out in full: one address tile plus gate * D * D compiled to a kernel that
    # spills 150 bytes more per thread (triton 3.6, sm_90, D = 96 in one piece; benchmarks/triton_resources.py).
    m = mask_k[:, None] & mask_j[None, :]
    wi = tl.load(w_ptr + d_base + (0 * D + j[None, :]) * D + k[:, None], mask=m, other=0.0)
    wf = tl.load(w_ptr + d_base + (1 * D + j[None, :]) * D + k[:, None], mask=m, other=0.0)
    wg = tl.load(w_ptr + d_base + (2 * D + j[None, :]) * D + k[:, None], mask=m, other=0.0)
    wo = tl.load(w_ptr + d_base + (3 * D + j[None, :]) * D + k[:, None], mask=m, other=0.0)
    return wi, wf, wg, wo


@triton.jit
def _load_w(w_ptr, d_base, D, k, mask_k, j, mask_j):
    """The same blocks as ``_load_w_t`` as (j, k) tiles (for dh = dz @ W)."""
    m = mask_j[:, None] & mask_k[None, :]
    wi = tl.load(w_ptr + d_base + (0 * D + j[:, None]) * D + k[None, :], mask=m, other=0.0)
    wf = tl.load(w_ptr + d_base + (1 * D + j[:, None]) * D + k[None, :], mask=m, other=0.0)
    wg = tl.load(w_ptr + d_base + (2 * D + j[:, None]) * D + k[None, :], mask=m, other=0.0)
    wo = tl.load(w_ptr + d_base + (3 * D + j[:, None]) * D + k[None, :], mask=m, other=0.0)
    return wi, wf, wg, wo


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
def _store_gates(ptr, g_ptrs, D, i, f, g, o, mask):
    """Four per-gate values (activations or gradients) to a 4D-per-direction slice, in ``ptr``'s dtype."""
    dt = ptr.dtype.element_ty
    tl.store(ptr + g_ptrs, i.to(dt), mask=mask)
    tl.store(ptr + g_ptrs + D, f.to(dt), mask=mask)
    tl.store(ptr + g_ptrs + 2 * D, g.to(dt), mask=mask)
    tl.store(ptr + g_ptrs + 3 * D, o.to(dt), mask=mask)


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
def _add_hw(h, wi, wf, wg, wo, zi, zf, zg, zo, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z += h @ W^T for the four gates (W^T blocks from ``_load_w_t``)."""
    zi = _dot(h, wi, zi, PRECISION, UPCAST)
    zf = _dot(h, wf, zf, PRECISION, UPCAST)
    zg = _dot(h, wg, zg, PRECISION, UPCAST)
    zo = _dot(h, wo, zo, PRECISION, UPCAST)
    return zi, zf, zg, zo


@triton.jit
def _add_dzw(dzi, dzf, dzg, dzo, wi, wf, wg, wo, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + sum over the gates of dz @ W (W blocks from ``_load_w``), dz in W's dtype for the tensor cores."""
    acc = _dot(dzi.to(wi.dtype), wi, acc, PRECISION, UPCAST)
    acc = _dot(dzf.to(wf.dtype), wf, acc, PRECISION, UPCAST)
    acc = _dot(dzg.to(wg.dtype), wg, acc, PRECISION, UPCAST)
    acc = _dot(dzo.to(wo.dtype), wo, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _cell_fwd(zi, zf, zg, zo, c, y_ptr, gates_ptr, c_ptr, pos, g_stride, o_stride, g_cols, o_cols, D, mask, SAVE):
    """The LSTM cell on one piece of the hidden state: gates, c_t (fp32), h_t; writes h_t (and, when SAVE, the gate
    activations and c_t for the backward). Returns (h_t in fp32, c_t)."""
    i = _sigmoid(zi)
    f = _sigmoid(zf)
    g = _tanh(zg)
    o = _sigmoid(zo)
    c = f * c + i * g
    h = o * _tanh(c)
    o_ptrs = pos[:, None] * o_stride + o_cols
    tl.store(y_ptr + o_ptrs, h.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        _store_gates(gates_ptr, pos[:, None] * g_stride + g_cols, D, i, f, g, o, mask)
        tl.store(c_ptr + o_ptrs, c, mask=mask)
    return h, c


@triton.jit
def _cell_bwd(i, f, g, o, dh, c, c_prev, dc, dgx_ptr, pos, g_stride, g_cols, D, mask):
    """The cell's backward on one piece: from dL/dh_t and dL/dc_t (through c_{t+1}) to the gate pre-activations'
    gradients, which it writes to dgx. Returns them and dL/dc_{t-1} (through c_t)."""
    tc = _tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    dzo = dh * tc * o * (1.0 - o)
    dzi = dc * g * i * (1.0 - i)
    dzf = dc * c_prev * f * (1.0 - f)
    dzg = dc * i * (1.0 - g * g)
    _store_gates(dgx_ptr, pos[:, None] * g_stride + g_cols, D, dzi, dzf, dzg, dzo, mask)
    return dzi, dzf, dzg, dzo, dc * f


# The hidden state is held in one or two pieces: units [0, BLOCK_A) ("a") and, when BLOCK_B > 0, units
# [BLOCK_A, BLOCK_A + BLOCK_B) ("b"). tl.dot needs power-of-two tiles: one piece pads D = 96 to 128, which puts
# 4 * 128 * 128 W_hh elements on chip (136-148 KiB of shared memory in bf16, more than consumer GPUs' ~100 KiB);
# two pieces of 64 + 32 hold exactly 4 * 96 * 96 and skip the padding's wasted products, at the price of four
# smaller tl.dot per gate instead of one. W blocks are named w<gate>_<from><to>: hidden piece -> gate piece.
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
    BLOCK_A: tl.constexpr,  # width of hidden piece a (a power of two >= 16; all of D, padded, when BLOCK_B = 0)
    BLOCK_B: tl.constexpr,  # width of hidden piece b (0: one piece); masks hide units >= D
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

    live, base = _tile(pid_n, N, S, stride_s, H, W, BLOCK_N)
    g_stride = NDIR * 4 * D
    o_stride = NDIR * D
    d_base = pid_d * 4 * D * D
    cdt = w_ptr.dtype.element_ty

    # W_hh stays on chip for the whole sequence (ptxas: in shared memory). Re-reading it from L1/L2 every step
    # was tried: ptxas reports more register spills for that variant.
    ja, ua, mask_a, gcol_a, ocol_a = _piece(pid_d, 0, D, live, BLOCK_A)
    wi_aa, wf_aa, wg_aa, wo_aa = _load_w_t(w_ptr, d_base, D, ja, ua, ja, ua)
    h_a = tl.zeros((BLOCK_N, BLOCK_A), dtype=cdt)
    c_a = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)
    # PREFETCH: step s+1's projections are loaded while step s computes (they do not depend on h), so the
    # serial chain per step is dot -> gates -> store instead of load -> dot -> gates -> store.
    if PREFETCH:
        zi_a, zf_a, zg_a, zo_a = _load_gx(gx_ptr, base, rev, T, stride_t, 0, g_stride, gcol_a, D, mask_a)
    if BLOCK_B > 0:
        jb, ub, mask_b, gcol_b, ocol_b = _piece(pid_d, BLOCK_A, D, live, BLOCK_B)
        wi_ab, wf_ab, wg_ab, wo_ab = _load_w_t(w_ptr, d_base, D, ja, ua, jb, ub)
        wi_ba, wf_ba, wg_ba, wo_ba = _load_w_t(w_ptr, d_base, D, jb, ub, ja, ua)
        wi_bb, wf_bb, wg_bb, wo_bb = _load_w_t(w_ptr, d_base, D, jb, ub, jb, ub)
        h_b = tl.zeros((BLOCK_N, BLOCK_B), dtype=cdt)
        c_b = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        if PREFETCH:
            zi_b, zf_b, zg_b, zo_b = _load_gx(gx_ptr, base, rev, T, stride_t, 0, g_stride, gcol_b, D, mask_b)

    for s in range(0, T):
        t = s + rev * (T - 1 - 2 * s)  # reversed directions walk t = T-1 ... 0
        pos = base + t * stride_t
        if PREFETCH:
            more = s + 1 < T
            nzi_a, nzf_a, nzg_a, nzo_a = _load_gx(
                gx_ptr, base, rev, T, stride_t, s + 1, g_stride, gcol_a, D, mask_a & more
            )
            if BLOCK_B > 0:
                nzi_b, nzf_b, nzg_b, nzo_b = _load_gx(
                    gx_ptr, base, rev, T, stride_t, s + 1, g_stride, gcol_b, D, mask_b & more
                )
        else:
            zi_a, zf_a, zg_a, zo_a = _load_gx(gx_ptr, base, rev, T, stride_t, s, g_stride, gcol_a, D, mask_a)
            if BLOCK_B > 0:
                zi_b, zf_b, zg_b, zo_b = _load_gx(gx_ptr, base, rev, T, stride_t, s, g_stride, gcol_b, D, mask_b)

        # z_t = W_ih x_t + b + W_hh h_{t-1}: the recurrent part, from every piece of h to every piece of z.
        zi_a, zf_a, zg_a, zo_a = _add_hw(h_a, wi_aa, wf_aa, wg_aa, wo_aa, zi_a, zf_a, zg_a, zo_a, PRECISION, UPCAST_DOT)
        if BLOCK_B > 0:
            zi_a, zf_a, zg_a, zo_a = _add_hw(
                h_b, wi_ba, wf_ba, wg_ba, wo_ba, zi_a, zf_a, zg_a, zo_a, PRECISION, UPCAST_DOT
            )
            zi_b, zf_b, zg_b, zo_b = _add_hw(
                h_a, wi_ab, wf_ab, wg_ab, wo_ab, zi_b, zf_b, zg_b, zo_b, PRECISION, UPCAST_DOT
            )
            zi_b, zf_b, zg_b, zo_b = _add_hw(
                h_b, wi_bb, wf_bb, wg_bb, wo_bb, zi_b, zf_b, zg_b, zo_b, PRECISION, UPCAST_DOT
            )

        # Padded units stay 0: their W rows and columns are masked to 0.
        h32, c_a = _cell_fwd(
            zi_a,
            zf_a,
            zg_a,
            zo_a,
            c_a,
            y_ptr,
            gates_ptr,
            c_ptr,
            pos,
            g_stride,
            o_stride,
            gcol_a,
            ocol_a,
            D,
            mask_a,
            SAVE,
        )
        h_a = h32.to(cdt)
        if BLOCK_B > 0:
            h32, c_b = _cell_fwd(
                zi_b,
                zf_b,
                zg_b,
                zo_b,
                c_b,
                y_ptr,
                gates_ptr,
                c_ptr,
                pos,
                g_stride,
                o_stride,
                gcol_b,
                ocol_b,
                D,
                mask_b,
                SAVE,
            )
            h_b = h32.to(cdt)
        if PREFETCH:
            zi_a, zf_a, zg_a, zo_a = nzi_a, nzf_a, nzg_a, nzo_a
            if BLOCK_B > 0:
                zi_b, zf_b, zg_b, zo_b = nzi_b, nzf_b, nzg_b, nzo_b


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
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
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

    live, base = _tile(pid_n, N, S, stride_s, H, W, BLOCK_N)
    g_stride = NDIR * 4 * D
    o_stride = NDIR * D
    d_base = pid_d * 4 * D * D
    # c_t of each step is the previous iteration's c_{t-1}: one cell-state load per step, not two.
    last = base + (T - 1) * (1 - rev) * stride_t  # where the backward starts: the last step

    ja, ua, mask_a, gcol_a, ocol_a = _piece(pid_d, 0, D, live, BLOCK_A)
    wi_aa, wf_aa, wg_aa, wo_aa = _load_w(w_ptr, d_base, D, ja, ua, ja, ua)
    dh_a = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)  # dL/dh_t through step t+1's gates
    dc_a = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)  # dL/dc_t through c_{t+1}
    c_a = tl.load(c_ptr + last[:, None] * o_stride + ocol_a, mask=mask_a, other=0.0)
    if PREFETCH:  # as in the forward: step s-1's loads are issued while step s computes
        i_a, f_a, g_a, o_a, dy_a, cp_a = _load_bwd_step(
            gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, gcol_a, ocol_a, D, T - 1, mask_a
        )
    if BLOCK_B > 0:
        jb, ub, mask_b, gcol_b, ocol_b = _piece(pid_d, BLOCK_A, D, live, BLOCK_B)
        wi_ab, wf_ab, wg_ab, wo_ab = _load_w(w_ptr, d_base, D, ja, ua, jb, ub)
        wi_ba, wf_ba, wg_ba, wo_ba = _load_w(w_ptr, d_base, D, jb, ub, ja, ua)
        wi_bb, wf_bb, wg_bb, wo_bb = _load_w(w_ptr, d_base, D, jb, ub, jb, ub)
        dh_b = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        dc_b = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        c_b = tl.load(c_ptr + last[:, None] * o_stride + ocol_b, mask=mask_b, other=0.0)
        if PREFETCH:
            i_b, f_b, g_b, o_b, dy_b, cp_b = _load_bwd_step(
                gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, gcol_b, ocol_b, D, T - 1, mask_b
            )

    for s_rev in range(0, T):
        s = T - 1 - s_rev  # processing order, backwards
        t = s + rev * (T - 1 - 2 * s)
        pos = base + t * stride_t
        if PREFETCH:
            more = s > 0
            ni_a, nf_a, ng_a, no_a, ndy_a, ncp_a = _load_bwd_step(
                gates_ptr,
                c_ptr,
                dy_ptr,
                base,
                rev,
                T,
                stride_t,
                g_stride,
                o_stride,
                gcol_a,
                ocol_a,
                D,
                s - 1,
                mask_a & more,
            )
            if BLOCK_B > 0:
                ni_b, nf_b, ng_b, no_b, ndy_b, ncp_b = _load_bwd_step(
                    gates_ptr,
                    c_ptr,
                    dy_ptr,
                    base,
                    rev,
                    T,
                    stride_t,
                    g_stride,
                    o_stride,
                    gcol_b,
                    ocol_b,
                    D,
                    s - 1,
                    mask_b & more,
                )
        else:
            i_a, f_a, g_a, o_a, dy_a, cp_a = _load_bwd_step(
                gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, gcol_a, ocol_a, D, s, mask_a
            )
            if BLOCK_B > 0:
                i_b, f_b, g_b, o_b, dy_b, cp_b = _load_bwd_step(
                    gates_ptr, c_ptr, dy_ptr, base, rev, T, stride_t, g_stride, o_stride, gcol_b, ocol_b, D, s, mask_b
                )

        dzi_a, dzf_a, dzg_a, dzo_a, dc_a = _cell_bwd(
            i_a, f_a, g_a, o_a, dy_a + dh_a, c_a, cp_a, dc_a, dgx_ptr, pos, g_stride, gcol_a, D, mask_a
        )
        c_a = cp_a
        if BLOCK_B > 0:
            dzi_b, dzf_b, dzg_b, dzo_b, dc_b = _cell_bwd(
                i_b, f_b, g_b, o_b, dy_b + dh_b, c_b, cp_b, dc_b, dgx_ptr, pos, g_stride, gcol_b, D, mask_b
            )
            c_b = cp_b

        # z = h_{t-1} @ W^T  =>  dh_{t-1} = dz @ W (padded rows/columns of W are zero). dW = dz^T @ h_{t-1} is
        # not accumulated here (4 fp32 D x D tiles would not fit in registers at D = 96): torch does it
        # afterwards as one GEMM over all positions, from dgx and the saved output.
        dh_a = _add_dzw(
            dzi_a,
            dzf_a,
            dzg_a,
            dzo_a,
            wi_aa,
            wf_aa,
            wg_aa,
            wo_aa,
            tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32),
            PRECISION,
            UPCAST_DOT,
        )
        if BLOCK_B > 0:
            dh_a = _add_dzw(dzi_b, dzf_b, dzg_b, dzo_b, wi_ab, wf_ab, wg_ab, wo_ab, dh_a, PRECISION, UPCAST_DOT)
            dh_b = _add_dzw(
                dzi_a,
                dzf_a,
                dzg_a,
                dzo_a,
                wi_ba,
                wf_ba,
                wg_ba,
                wo_ba,
                tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32),
                PRECISION,
                UPCAST_DOT,
            )
            dh_b = _add_dzw(dzi_b, dzf_b, dzg_b, dzo_b, wi_bb, wf_bb, wg_bb, wo_bb, dh_b, PRECISION, UPCAST_DOT)
        if PREFETCH:
            i_a, f_a, g_a, o_a, dy_a, cp_a = ni_a, nf_a, ng_a, no_a, ndy_a, ncp_a
            if BLOCK_B > 0:
                i_b, f_b, g_b, o_b, dy_b, cp_b = ni_b, nf_b, ng_b, no_b, ndy_b, ncp_b


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


@triton.jit
def layer_norm_bwd_kernel(
    x_ptr,  # M x C, contiguous (the forward's input)
    dy_ptr,  # M x C, contiguous
    w_ptr,  # C
    mean_ptr,  # M fp32, from the forward
    rstd_ptr,  # M fp32
    dx_ptr,  # M x C, in x's dtype
    dw_ptr,  # P x C fp32: this program's share of dL/dw (summed over programs afterwards)
    db_ptr,  # P x C fp32: the same for dL/db
    M,
    C,
    rows_per_program,  # a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # y = xhat * w + b, xhat = (x - mean) * rstd  =>  dx = rstd * (w dy - mean_C(w dy) - xhat * mean_C(w dy xhat)),
    # dw = sum over rows of dy * xhat, db = sum of dy. Math in fp32 whatever the dtypes.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid * rows_per_program
    for r0 in range(first, first + rows_per_program, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask_r = rows < M
        mask = mask_r[:, None] & mask_c[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_ptr + pid * C + cols, dw, mask=mask_c)
    tl.store(db_ptr + pid * C + cols, db, mask=mask_c)
