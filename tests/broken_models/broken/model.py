raise ImportError("this model is broken on purpose")
