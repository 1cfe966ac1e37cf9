"""What the training clusters capture (Caron et al., ICCV 2019, Sec. 5.3, Figs. 4-7), from
the tables a run keeps under MODEL_DIR/assignments (`--keep_assignments`):

  python -m dc_tf.analysis nmi RUN_DIR [--labels_from=EXPORT] [--reference=ROTNET_RUN]
  python -m dc_tf.analysis page RUN_DIR [--epoch=E] [--clusters=12]
  python -m dc_tf.analysis colour RUN_DIR [--reference=ROTNET_RUN] [--clusters=3000]

metadata: the shards' metadata fields the clusters are scored against (streamed);
nmi: NMI from contingency counts, per kept table (Fig. 4); page: members and dominant
metadata of sampled clusters (Fig. 5); colour: the colour spread of clusters (Figs. 6-7);
reference: a reference run's trunk clustered with the same k (the figures' RotNet line).
"""
