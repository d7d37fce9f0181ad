"""The reference pre-training loop, nanoGPT-style: where a kernel win has to show up as a faster
training run that learns the same.

model.py    the GPT (GPT-2 architecture), attention passed in
data.py     the embedded standard-library corpus, --data files, deterministic batches
presets.py  smoke, cpu-tiny, gpt2-124m, and the resolved TrainConfig
kernels.py  reference (torch) or tuned (kerneltune's registry) attention and AdamW
mfu.py      the peak FLOP/s that MFU is stated against
loop.py     one run: schedule, accumulation, DDP, evaluation, checkpoint/resume, log lines
compare.py  reference and tuned in lockstep: speedup, loss agreement, compare.json + compare.png
"""
