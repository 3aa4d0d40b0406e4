"""Packaging for ke_fast.

`ke_fast.kernels` lives in the top-level `kernels/` folder (its own room, see ARCHITECTURE.md) and is
mapped into the package with `package_dir`; this works for wheels and editable installs alike.

The C++ CPU kernels (kernels/csrc) are compiled here, at install, against the torch already installed, so
the first use builds nothing. Install without build isolation (an isolated build environment would pull a
multi-GB torch of its own): `pip install --no-build-isolation -e .` (setuptools, wheel and ninja must be
present; `make install` does this). The module is named `ke_fast.kernels._cpu_<tag>`, the tag hashing the
C++ source and this CPU (the kernels are built with -march=native, as at first use): a module built for
another CPU or from another source is never loaded; ke_fast then builds the kernels at first use, as it
does where torch is not importable here or the compiler fails (the extension is optional: installation
goes on without it).
"""
import importlib.util
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _cpu_extension():
    """([the C++ extension], {"build_ext": torch's BuildExtension}), or nothing where torch is not importable."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    # the install tag and flags come from kernels/backend.py (loaded by path: it imports nothing of torch at
    # its top), so the module built here is the one backend.cpu_extension() looks for
    spec = importlib.util.spec_from_file_location("_ke_fast_backend", HERE / "kernels" / "backend.py")
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    ext = CppExtension(f"ke_fast.kernels.{backend.INSTALLED_PREFIX}{backend.install_tag()}",
                       ["kernels/csrc/ke_fast_cpu.cpp"], extra_compile_args=backend.CFLAGS,
                       extra_link_args=backend.LDFLAGS, optional=True)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpu_extension()

setup(
    name="ke-fast",
    version="0.1.0",
    description="Triton kernels and a thin PyTorch layer for Knowledge Evolution (KE) masked training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["ke_fast", "ke_fast.kernels"],
    package_dir={"ke_fast": "ke_fast", "ke_fast.kernels": "kernels"},
    package_data={"ke_fast.kernels": ["csrc/*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "ninja",
        # Triton only where it is published (Linux x86_64 / aarch64); elsewhere ke_fast runs its C++ kernels or
        # the reference and never imports Triton
        "triton>=3.1; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-randomly", "scipy"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "demo": ["scikit-learn", "tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["ke-fast = ke_fast.cli:console"]},
)
