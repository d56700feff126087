from setuptools import setup

setup(
    name="sparse-lth",
    version="0.1.0",
    description="Lottery tickets by iterative magnitude pruning, trained on Triton kernels that skip pruned weights",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sparse_lth", "sparse_lth.kernels"],
    package_dir={"sparse_lth": "sparse_lth", "sparse_lth.kernels": "kernels"},
    install_requires=[
        # bounds admit the CPU stack (torch 2.14.1 / torchvision 0.29.1 / triton 3.8.0) and the GPU machine's
        # (torch 2.11 / torchvision 0.26 / triton 3.6)
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["sparse-lth=sparse_lth.cli:main"]},
)
