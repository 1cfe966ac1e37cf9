"""Supervised training of VGG-16-BN from a pre-trained trunk (Caron et al., ICCV 2019,
Tables 2 and 5): facebookresearch/DeeperCluster's `eval_pretrain.py` under tf.distribute.

Read in the order `python -m dc_tf.finetune` uses them: `config` (the frozen recipe),
`model` (the trunk from a run dir, an export or random init; the Sobel front turned into a
trainable 5x5 conv1 as the original's `sobel2RGB`; fc6/fc7 re-initialised; the classifier),
`data` (labelled shards: random resized crops for training, centre crops for validation),
`run` (the resumable training loop, top-1/top-5 each epoch).
"""
