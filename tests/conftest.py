import torch

# The test suite runs many small operations; one intra-op thread avoids oversubscription stalls on
# a loaded 2-core machine and keeps results bit-reproducible from run to run.
torch.set_num_threads(1)
