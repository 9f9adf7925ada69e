"""What a job is, shared by the launcher and every rank: the config tree and its errors, the
parallel layout, the Baichuan spec and the planner. Torch-free and paramiko-free; imports
neither `launcher` nor `train` (both import it)."""
