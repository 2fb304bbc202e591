from setuptools import setup

setup(
    name="pyprefopt",
    version="0.1.0",
    description="Fused kernels for preference fine-tuning (SFT, DPO, IPO, CPO, KTO) of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` holds the Triton kernels; it is installed as `pyprefopt.kernels` because a top-level
    # `kernels` package would clash with an unrelated PyPI project.
    packages=["pyprefopt", "pyprefopt.kernels"],
    package_dir={"pyprefopt": "pyprefopt", "pyprefopt.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.46",
        "peft>=0.13",
        "bitsandbytes>=0.45",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4"],
        # Peers our tests use as oracles and our benches measure against.
        "peers": ["trl>=1.0", "liger-kernel>=0.8"],
    },
)
