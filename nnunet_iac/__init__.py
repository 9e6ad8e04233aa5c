"""The nnU-Net v2 trainer plugin of IAC-LTH (iac_trainers.py); nnU-Net finds it through nnUNet_extTrainer."""
