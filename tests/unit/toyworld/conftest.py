import torch

# The test machine's cores are shared: never use more than two threads.
torch.set_num_threads(min(2, torch.get_num_threads()))
