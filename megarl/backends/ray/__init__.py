"""A rollout fleet on Ray (``rollout.placement=ray``): vLLM engines as Ray actors, fed weights over a process group
of their own (``channel.py``). The only importer of ray."""
