"""Online and batch serving of an exported tracktower artifact; never imports training code."""
