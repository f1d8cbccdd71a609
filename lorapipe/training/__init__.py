"""The train stage: the recipe, TRL's SFTTrainer with this project's loss and batching, resumption, launch."""
