"""regdpo: GT-Pair preference data and Reg-DPO fine-tuning for video diffusion models."""
__version__ = "0.1.0"
