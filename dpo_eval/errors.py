"""The one exception type for errors a user can cause."""


class DpoEvalError(Exception):
    """Bad input from the user: the message names the file, record or parameter and what to do."""


def is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator that ran out of memory, told by the exception's type, never by a message alone:
    torch.OutOfMemoryError (the CUDA caching allocator's, and what dpo-eval's own batch budget raises), and
    torch.AcceleratorError (a kernel's CUDA error, torch >= 2.8) whose CUDA error is out of memory. A lost
    connection or any other error is not, whatever its message says."""
    try:
        import torch
    except ImportError:  # no torch, no accelerator memory to run out of
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator = getattr(torch, "AcceleratorError", None)
    return accelerator is not None and isinstance(exc, accelerator) and "out of memory" in str(exc).lower()
