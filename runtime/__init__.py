"""dtplan runtime: lower a plan into a per-rank sharded GraphModule and run it on torch.distributed."""
