"""Compile every Triton kernel for an H100 (sm_90) without a GPU: Triton's real front end
and code generator (the interpreter accepts programs the compiler rejects). Run in a process
without TRITON_INTERPRET (test_compile.py does); prints one line per kernel, exit 1 on errors.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diptych.backends.torch.cuda.kernels import attention as at
from diptych.backends.torch.cuda.kernels import norm
from diptych.backends.torch.cuda.kernels import qmatmul as qm

I = "i32"
C = "constexpr"
PLANES = dict(q_ptr="*u8", qh_ptr="*u8", d_ptr="*fp16", m_ptr="*fp16", sc_ptr="*u8",
              lut_ptr="*fp32")
MM = dict(x_ptr="*bf16", y_ptr="*bf16", bias_ptr="*fp32", **PLANES, M=I, N=I, K=I,
          stride_xm=I, stride_ym=I)


def kernels():
    for t in qm.KERNEL_TYPES:
        planes = dict(MM, q_ptr="*i8") if t == qm.QT.Q8_0 else MM
        yield (f"gemv {t.name}", qm._gemv, dict(planes, TYPE=C, HAS_BIAS=C, BM=C, BN=C, BK=C),
               dict(TYPE=int(t), HAS_BIAS=True, BM=2, BN=16, BK=256))
    yield ("gemm Q4_K", qm._gemm, dict(MM, TYPE=C, HAS_BIAS=C, IEEE=C, BM=C, BN=C, BK=C),
           dict(TYPE=int(qm.QT.Q4_K), HAS_BIAS=False, IEEE=False, BM=64, BN=64, BK=64))
    yield ("dequantize Q6_K", qm._dequant,
           dict(out_ptr="*bf16", ids_ptr="*i64", **PLANES, R=I, row0=I, K=I, stride_out=I,
                TYPE=C, GATHER=C, BN=C, BK=C),
           dict(TYPE=int(qm.QT.Q6_K), GATHER=True, BN=16, BK=256))
    gqa = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", qpos_ptr="*i32",
               slot_pos_ptr="*i32", po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", T=I, S=I,
               D=I, window=I, sm_scale="fp32", n_split=I, sq_b=I, sq_t=I, sq_h=I, sk_b=I,
               sk_h=I, sk_s=I, sv_b=I, sv_h=I, sv_s=I, HKV=C, G=C, KEYS=C, IEEE=C, BR=C, BS=C,
               BD=C)
    for keys in (at.KEYS_FULL, at.KEYS_EXPLICIT):
        yield (f"decode attention keys={keys}", at._gqa_split, gqa,
               dict(HKV=8, G=4, KEYS=keys, IEEE=False, BR=16, BS=64, BD=128))
    yield ("combine", at._combine,
           dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", out_ptr="*bf16", n_split=I,
                T=I, D=I, so_b=I, so_t=I, so_h=I, NX=C, GROUP=C, H=C, BR=C, BD=C, BSPLIT=C),
           dict(NX=8, GROUP=4, H=32, BR=16, BD=128, BSPLIT=32))
    yield ("mla decode", at._mla_split,
           dict(ql_ptr="*bf16", qp_ptr="*bf16", c_ptr="*bf16", kp_ptr="*bf16",
                qpos_ptr="*i32", po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", T=I, H=I,
                S=I, R=I, P=I, sm_scale="fp32", n_split=I, sql_b=I, sql_t=I, sql_h=I,
                sqp_b=I, sqp_t=I, sqp_h=I, sc_b=I, sc_s=I, skp_b=I, skp_s=I, NHB=C, BH=C,
                IEEE=C, BR=C, BS=C, BL=C, BP=C),
           dict(NHB=8, BH=16, IEEE=False, BR=16, BS=32, BL=512, BP=64))
    yield ("write_kv", at._write_kv,
           dict(k_ptr="*bf16", v_ptr="*bf16", kc_ptr="*bf16", vc_ptr="*bf16", slot_ptr="*i64",
                T=I, S=I, D=I, sk_b=I, sk_t=I, sk_h=I, sv_b=I, sv_t=I, sv_h=I, sc_b=I, sc_h=I,
                sc_s=I, svc_b=I, svc_h=I, svc_s=I, HKV=C, HAS_V=C, BD=C),
           dict(HKV=8, HAS_V=True, BD=128))
    yield ("rms_norm", norm._rms_norm,
           dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*fp32", y_ptr="*bf16", sum_ptr="*bf16",
                D=I, eps="fp32", sx=I, sr=I, sy=I, ss=I, RESIDUAL=C, BD=C),
           dict(RESIDUAL=True, BD=4096))
    yield ("rope", norm._rope,
           dict(x_ptr="*bf16", y_ptr="*bf16", pos_ptr="*i64", inv_freq_ptr="*fp32", T=I, H=I,
                DH=I, HALF=I, mscale="fp32", sx_b=I, sx_t=I, sx_h=I, sy_b=I, sy_t=I, sy_h=I,
                BH=C, BDH=C),
           dict(BH=32, BDH=128))


def aligned_pointers(fn, signature) -> dict:
    """Mark pointer arguments 16-byte aligned, as the launcher does for torch tensors."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature.get(name, "").startswith("*")}


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, fn, signature, constexprs in kernels():
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                            attrs=aligned_pointers(fn, signature))
            k = triton.compile(src, target=target, options={"num_warps": 4})
            print(f"ok   {name} (shared memory {k.metadata.shared} B)")
        except Exception as e:  # report every kernel, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
