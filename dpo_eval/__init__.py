"""dpo-eval: did the DPO alignment take, and how did it change what the model writes?"""

__version__ = "0.1.0"
