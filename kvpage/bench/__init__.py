"""``kvpage bench``: the memory-layout benchmark of issue #5.

``run`` drives seeded workloads (:mod:`kvpage.workloads`) through the real
engine under the paged layout and the two contiguous baselines with one KV
budget; ``report`` prints the table, writes ``report.md``, PNG plots and
JSON, and judges the figures against the PagedAttention paper's.
"""
