"""Install the active label refinement plugin for Label Studio.

The torch and torchvision pins match the wheels this project is tested with
(torch 2.14.1, torchvision 0.29.1); label-studio-ml 1.0.9 is the newest release
of the ML backend library on PyPI.  redis and rq are declared here because
label-studio-ml imports them without declaring them.
"""
from setuptools import find_packages, setup

setup(
    name="active-label-refinement",
    version="0.1.0",
    description=(
        "Label Studio ML backend that finds and ranks mislabelled images in "
        "imbalanced medical image datasets (Co-teaching + Variance of Gradients)"
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["ml_backend", "ml_backend.*", "model", "model.*",
                                    "selection", "selection.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy>=1.24,<3",
        "scikit-learn>=1.3,<2",
        "pillow>=9",
        "h5py>=3.8,<4",
        "tqdm>=4.60,<5",
        "matplotlib>=3.7,<4",
        "label-studio-ml==1.0.9",
        "label-studio-sdk>=2.1,<3",
        "redis>=5,<9",
        "rq>=2,<4",
        "requests>=2.28,<3",
        "gunicorn>=21",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pyyaml>=6", "selenium>=4.20", "hypothesis>=6.100"],
        "bench": ["cleanlab>=2.6,<3"],
    },
    entry_points={
        "console_scripts": [
            "alr-simulate=selection.simulate:main",
        ],
    },
)
