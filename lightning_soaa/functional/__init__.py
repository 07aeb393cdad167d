"""Pure math kernels. Imports torch only: never torch.distributed, lightning or deepspeed.

Each kernel works on one block (a whole tensor, a slice of one, or a 1-D slice of a DeepSpeed flat
partition) and returns anything global as small float64 partials for the optimizer to reduce.
"""
