"""Packaging for ke_fast.

`ke_fast.kernels` lives in the top-level `kernels/` folder (its own room, see ARCHITECTURE.md) and is
mapped into the package with `package_dir`; this works for wheels and editable installs alike.
The optional C++ CPU kernels are compiled on first use (torch.utils.cpp_extension + ninja), so
installation never probes the machine.
"""
from setuptools import setup

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
    install_requires=[
        "torch>=2.4",
        "numpy",
        "ninja",
        "triton>=3.1; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "scipy"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "demo": ["scikit-learn", "tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["ke-fast = ke_fast.cli:main"]},
)
