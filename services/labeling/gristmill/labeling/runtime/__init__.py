"""What labeling runs outside its domain rules: base models' tokenizers (registry + object store, or a local
directory) behind the domain's ``TokenizerSource`` port."""
