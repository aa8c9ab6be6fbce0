"""Distributed forms of kdfast's losses: vocabulary-parallel (tensor-parallel) rows and LM heads,
and DTensor / FSDP2 LM-head weights."""
