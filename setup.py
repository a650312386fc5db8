from setuptools import find_packages, setup

setup(
    name="allennlp-analyze",
    version="0.1.0",
    description="Rank collapse and power-law (heavy-tailed) spectral analysis of trained weight matrices",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["allennlp_analyze", "allennlp_analyze.*"]),
    python_requires=">=3.9",
    # The core and the standalone CLI need numpy (tqdm: progress bars; threadpoolctl: one BLAS
    # thread per worker). safetensors files are read without the safetensors package; torch is
    # imported lazily, only for pickled state dicts and nn.Modules.
    install_requires=["numpy>=1.21", "tqdm", "threadpoolctl"],
    extras_require={
        "torch": ["torch"],
        "plots": ["matplotlib"],
        "allennlp": ["allennlp==2.10.1"],
        "hub": ["huggingface_hub>=0.25"],
        "dask": ["dask[distributed]"],
        "keras": ["h5py"],
        "gguf": ["gguf>=0.19"],
        "onnx": ["onnx"],
    },
    entry_points={"console_scripts": ["allennlp-analyze=allennlp_analyze.cli:main"]},
)
