# GPU training image: maskrcnn on the official PyTorch CUDA image, launched with torchrun.
#
#   docker build -t maskrcnn:0.1.0 .
#   docker run --gpus all --ipc=host -v /data/coco:/data/coco:ro -v /data/weights:/weights:ro \
#     -v "$PWD/runs:/runs" maskrcnn:0.1.0
#
# /data/weights holds torchvision's ResNet-50 ImageNet file, resnet50-0676ba61.pth (fetched once
# from https://download.pytorch.org/models/resnet50-0676ba61.pth; nothing is downloaded at run
# time, and the COCO configs stop without it).
#
# torch, torchvision and Triton come from the base image, not from requirements.lock: the lock
# pins the CPU development machine (torch 2.14.1 with CUDA 13 wheels from PyPI), while the
# image keeps the torch 2.11 + CUDA 13.0 + cuDNN 9 build that the base image ships and was
# tested with, together with its matching torchvision and Triton; pyproject's bounds
# (torch>=2.4, torchvision>=0.19) accept it. Every other runtime dependency of the package is
# installed at exactly the version requirements.lock pins (tests/test_deploy.py checks the
# pins below against the lock, and that no runtime dependency is left out). The lock's
# development tools (pytest, ruff, grpcio-tools, PyYAML) stay out of the image.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9

# Stage 1: every wheel the image installs besides the base image's own packages. The devel
# image has the compiler that pycocotools' C extension needs and the same Python as the
# runtime image; pycocotools is built from source here so its wheel matches that Python.
FROM ${PYTORCH_IMAGE}-devel AS wheels
WORKDIR /src
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
      --no-binary=pycocotools \
      pycocotools==2.0.11 \
      absl-py==2.5.1 \
      faster-coco-eval==1.8.0 \
      numpy==2.4.6 \
      packaging==26.3 \
      pillow==13.0.0 \
      protobuf==5.29.6 \
      tensorboardX==2.6.5 \
      tqdm==4.70.1
COPY pyproject.toml README.md ./
COPY maskrcnn ./maskrcnn
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Only the wheels, for machines without network access (Python and platform of this image):
#   docker build --target wheelhouse --output type=local,dest=wheelhouse .
FROM scratch AS wheelhouse
COPY --from=wheels /wheels /

# Stage 2: the training image. --no-index: every dependency the maskrcnn wheel declares must
# be either in the base image (torch, torchvision) or among the wheels built above, or the
# build stops here.
FROM ${PYTORCH_IMAGE}-runtime
COPY --from=wheels /wheels /tmp/wheels
RUN python -m pip install --no-cache-dir --no-index --find-links=/tmp/wheels /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "import sys, torch, torchvision, triton, pycocotools.mask; \
from maskrcnn.config import load_config; load_config('8x4'); \
assert torch.version.cuda, 'the base image must carry a CUDA build of torch'; \
print('python', sys.version.split()[0], 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace
# One process per visible GPU on this node. Arguments after the image name replace CMD, e.g.
#   docker run ... maskrcnn:0.1.0 --nproc_per_node=gpu -m maskrcnn.train --config=8x1 ...
# and `--entrypoint maskrcnn-eval` (or maskrcnn-predict) runs another command.
ENTRYPOINT ["torchrun"]
CMD ["--nproc_per_node=gpu", "-m", "maskrcnn.train", "--config=8x4", "--data_dir=/data/coco", \
     "--backbone_weights=/weights/resnet50-0676ba61.pth", "--output_dir=/runs/8x4"]
