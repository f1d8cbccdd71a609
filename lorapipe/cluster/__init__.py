"""Work beyond one machine on engines users already run: a sweep on a Ray cluster or DVC's queue, multi-machine
training started through Ray, cloud GPUs through SkyPilot (configs/skypilot/)."""
