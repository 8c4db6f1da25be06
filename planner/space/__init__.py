"""The search space: every node's candidate strategies (input and output
placements), from DTensor's rules (through the `_dtensor` adapter), dtplan's
own rules (`rules`) and the Replicate fallback (`strategies`)."""
