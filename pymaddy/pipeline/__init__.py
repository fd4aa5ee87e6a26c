"""The message pipeline (msgpipeline and the pipeline inside smtp/submission/lmtp) and module groups."""
