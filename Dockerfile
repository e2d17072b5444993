# fetaliqa: ACOUSLIC-AI algorithm container for grand-challenge.org.
# Build: bash test/docker/build.sh   Test: bash test/docker/test_run.sh   Export: bash test/docker/export.sh
#
# The platform runs linux/amd64 only, hence --platform in FROM (the challenge template's form).
# The base image's torch is the 2.14.1 of requirements.txt; its CUDA 12.6 build runs on the
# platform's T4 (sm_75) with drivers older than CUDA 13 needs. pip must never install torch
# again (a second multi-GB CUDA stack): torch/torchvision are filtered from the requirements
# and pinned to the base image's versions as constraints, and the build checks both. Everything
# else they pull in is pinned by constraints.txt (less the base image's CUDA stack).
# hadolint ignore=DL3029
FROM --platform=linux/amd64 pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/user \
    MPLCONFIGDIR=/home/user/.config/matplotlib \
    XDG_CACHE_HOME=/home/user/.cache \
    TORCH_HOME=/home/user/.cache/torch

# /tmp is an empty volume at run time: every cache/config path above lives in the home.
RUN groupadd -r user && useradd -m --no-log-init -r -g user user \
    && mkdir -p /home/user/.config/matplotlib /home/user/.cache \
    && chown -R user:user /home/user

WORKDIR /opt/app

COPY requirements.txt constraints.txt /opt/app/
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" > /opt/app/constraints-image.txt \
    && grep -q '^torch==2.14.1' /opt/app/constraints-image.txt \
    && grep -q '^torchvision==0.29.1' /opt/app/constraints-image.txt \
    && grep -vE '^(#|torch==|torchvision==|triton==|nvidia-|cuda-)' constraints.txt >> /opt/app/constraints-image.txt \
    && grep -vE '^(torch|torchvision)==' requirements.txt > /opt/app/requirements-image.txt \
    && python -m pip install --no-cache-dir -r /opt/app/requirements-image.txt -c /opt/app/constraints-image.txt \
    && python -c "import torch, open_clip, SimpleITK, cv2, safetensors, matplotlib; assert torch.__version__.startswith('2.14.1')"

# Code and the embedded default model (resources/model) are baked in, read-only for user.
COPY fetaliqa /opt/app/fetaliqa
COPY resources /opt/app/resources
COPY inference.py /opt/app/

# The template's non-root user (by name, created above).
# hadolint ignore=DL3066
USER user

ENTRYPOINT ["python", "inference.py"]
