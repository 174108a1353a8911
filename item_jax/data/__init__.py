"""Catalogue files → sharded TFRecords → tf.data host batches."""
