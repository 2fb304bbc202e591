import os

# Triton decides whether a `@triton.jit` function is interpreted when it is decorated, and its own standard library
# (tl.sum's combine functions, tl.cdiv, ...) is decorated when triton is first imported: the interpreter works only if
# TRITON_INTERPRET is set before that import, anywhere in the process. A bench test can import triton long before
# gpu_check.py's CPU dry run asks for the interpreter (importlib.util.find_spec("liger_kernel.transformers") imports
# liger_kernel, which imports triton), so it is set here, as tests/conftest.py sets it for the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
