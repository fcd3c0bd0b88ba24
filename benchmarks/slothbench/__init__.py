"""The one benchmark runner's parts (driven by benchmarks/run.py):

    models     model shapes (every family of the architecture table, at public shapes) as data,
               create-and-save a random-init model once per shape, load it per implementation
               (the implementations themselves are data: IMPLS)
    data       token batches: fixed bs x seq, or long-tailed SFT lengths (padded / packed)
    meter      timing, peak memory kept across others' resets, garbage-collector time, MFU
    profile    torch.profiler / cProfile summaries per kernel category (e2e --profile, multi-GPU)
    scenarios  named scenarios and the cross-family matrix, as data
    plot       tokens/s against peak GiB, one point per implementation, the Pareto front marked

Importable as ``slothbench`` once benchmarks/_common.py is imported (it registers the package;
benchmarks/ itself stays off sys.path so benchmarks/kernels.py never shadows HF's `kernels`).
"""
