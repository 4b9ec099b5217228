// placeholder: replaced by the block manager
