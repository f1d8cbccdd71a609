"""Records to instructions: prompts, cleaning, splits, the mix; the instructify and mix stages."""
