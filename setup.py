"""cai_jax: Constitutional AI (Bai et al. 2022) in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name='cai_jax',
    version='0.1.0',
    description='Constitutional AI (SL-CAI, RL-CAI from AI feedback, PPO) in JAX/Flax NNX',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(
        include=['cai_jax', 'cai_jax.*', 'configs', 'configs.*', 'experiments', 'experiments.*']
    ),
    package_data={
        'cai_jax': ['assets/*', 'assets/**/*'],
        'configs': ['constitutions/*.json', 'constitutions/*.md'],
    },
    include_package_data=True,
    install_requires=[
        'jax>=0.7',
        'flax>=0.12',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'ml-collections>=1.0',
        'absl-py',
        'numpy',
        'ml_dtypes',
        # transformers only for tokenizers and HF config export; it does not pull torch.
        'transformers>=5.0',
        'jinja2',  # transformers renders chat templates (conversation_format='chat_template') with it
        'tokenizers',
        'sentencepiece',
        'protobuf',
        'tensorflow-datasets>=4.9.7',  # used without TensorFlow (array_record data sources)
        'array-record',
        'safetensors',
        'gguf>=0.17',
        'tqdm',
        'tensorboardX',
        'matplotlib',
        'pyyaml',  # reads pyrit's AdvBench seed file
    ],
    extras_require={
        # The parity reference: a CPU build of torch (2.13.0 is the one on local disk here; an
        # unpinned torch would pull a multi-GB CUDA build) and accelerate for transformers' GGUF loader.
        # jax[tpu] brings libtpu, whose compiler tests/test_aot.py runs without a TPU.
        'test': [
            'pytest',
            # The suite runs on two workers (README line 5): its subprocess pipeline runs are
            # single-threaded most of the time, so two cores finish it in about half the time.
            'pytest-xdist',
            'torch==2.13.0',
            'accelerate',
            'peft',  # loads an export's LoRA adapter directory onto the base (tests/test_lora.py)
            'nbclient',
            'nbformat',
            'ipykernel',
            'jax[tpu]==0.10.2',
            'pyink==26.5.1',
        ],
    },
)
