//! segviz-fed
