"""The benchmark command's parts (`maskrcnn/benchmark.py` runs them).

synthetic.py: batches built in memory, and the same content in torchvision's input format.
measure.py: step timing with the device synchronised, peak memory, FLOP counting, peak FLOP/s.
step.py: our training step (the trainer's own) and inference step on a fixed batch.
torchvision_baseline.py: torchvision's Mask R-CNN at equivalent settings, and its steps.
breakdown.py: where our training step's time goes, by stage (torch.profiler).
ops.py: op micro-benchmarks against torchvision.ops at training-step sizes.
loader.py: the input pipeline's throughput (--loader): stages, samples, DataLoader workers.
"""
