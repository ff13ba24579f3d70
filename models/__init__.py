"""flashtrain's model zoo (GPT-2, BERT, rotary/GQA decoder) on ``kernels.flash_attention``."""
