"""The cost model: device profiles with the roofline and collective time
formulas (`device`), the price of a node's compute and of a redistribution
under a strategy (`pricing`), and bytes live per device (`memory`)."""
