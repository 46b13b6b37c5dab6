"""Compile CUDA source to PTX with NVRTC through ctypes: no GPU, no driver, no CuPy.

NVRTC is a plain library (CUDA's PyPI wheel nvidia-cuda-nvrtc-cu12 ships it), so CI can
compile t2t_ref's kernels on a machine without a GPU and fail on a typo before any device
sees the code. CuPy's own compiler entry point asks the driver for the GPU's architecture
first, which fails without one; here the architecture is named (compute_80: Ampere, the
oldest that the project's GPUs are).
"""

import ctypes
import glob
import os
import sys


def find_nvrtc():
    """Path of libnvrtc.so from the nvidia-cuda-nvrtc wheel, or None."""
    for base in sys.path:
        hits = sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        hits = [h for h in hits if "alt" not in os.path.basename(h)]
        if hits:
            return hits[0]
    return None


def compile_to_ptx(source, name_expressions=(), options=(), arch="compute_80"):
    """-> (ok, log, lowered names): compile `source`, instantiating the template names given.
    The PTX of the last successful compilation is left in compile_to_ptx.last_ptx."""
    lib = ctypes.CDLL(find_nvrtc())
    prog = ctypes.c_void_p()

    def check(status, what):
        if status != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"t2t_ref_kernels.cu",
                                 0, None, None), "nvrtcCreateProgram")
    try:
        for name in name_expressions:
            check(lib.nvrtcAddNameExpression(prog, name.encode()), f"add {name}")
        args = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        argv = (ctypes.c_char_p * len(args))(*args)
        status = lib.nvrtcCompileProgram(prog, len(args), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = {}
        if status == 0:
            for name in name_expressions:
                out = ctypes.c_char_p()
                check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)),
                      f"lowered name of {name}")
                lowered[name] = out.value.decode()
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            compile_to_ptx.last_ptx = ptx.value.decode()
        return status == 0, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def find_ptxas():
    """Path of ptxas from the nvidia-cuda-nvcc wheel, or None."""
    for base in sys.path:
        path = os.path.join(base, "nvidia", "cuda_nvcc", "bin", "ptxas")
        if os.access(path, os.X_OK):
            return path
    return None


def assemble(ptx, arch):
    """-> (ok, log): ptxas assembles PTX into machine code for arch (sm_80, sm_90), as the
    driver does when CuPy loads a module. NVRTC passes inline PTX (asm statements) through
    unread; this is where a wrong instruction or operand is found."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernels.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([find_ptxas(), f"-arch={arch}", source, "-o",
                               os.path.join(folder, "kernels.cubin")],
                              capture_output=True, text=True)
    return done.returncode == 0, done.stdout + done.stderr
