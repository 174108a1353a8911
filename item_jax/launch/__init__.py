"""Starting real jobs: ahead-of-time compilation for a target topology
(`compile`) and the cloud TPU pod launcher (`tpu_pod`); the shell scripts that
use them are in the repository's launch/ folder."""
