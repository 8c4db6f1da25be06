"""Reductions of the search space before the integer program: nodes that
follow their producer's choice (`followers`), repeated layers sharing one
layer's choices (`fold`), one redistribution per value read by several
consumers (`hubs`), and 3-axis meshes planned on merged axes (`coarsen`)."""
