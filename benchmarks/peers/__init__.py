"""Peer RETRO implementations timed beside ours by ``benchmarks/train_step.py --peers-python``.

One adapter module per peer (each builds the peer's model at the benchmark shape and times it with
``peers.common``); they run in the separate peers venv (``make peers-venv``), never in the project's.
"""

# module name -> label shown in the benchmark table
ADAPTERS: dict[str, str] = {
    "labml_retro": "labml-nn 0.5.1",
    "megatron_retro": "megatron-core 0.15.3",
    "lucidrains_retro": "retro-pytorch 0.3.9",
}
